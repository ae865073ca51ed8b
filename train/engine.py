"""The only module that touches DeepSpeed and torch.distributed: process group, DeepSpeed config, rank helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

ZERO_STAGES = (0, 1, 2, 3)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    offload_optimizer: bool = False   # ZeRO-2/3: optimizer state in CPU memory
    offload_params: bool = False      # ZeRO-3: parameters in CPU memory
    bf16: str = "auto"                # auto: on where the accelerator supports bf16 (CUDA), off on CPU
    torch_adam: bool = True           # torch's AdamW; false: DeepSpeed's fused Adam (JIT-built)
    context_parallel: int = 1         # ranks that split each sequence (DeepSpeed's sequence-parallel groups)

    def validate(self) -> None:
        if self.zero_stage not in ZERO_STAGES:
            raise ValueError(f"deepspeed.zero_stage={self.zero_stage}; allowed: {', '.join(map(str, ZERO_STAGES))}")
        if self.offload_optimizer and self.zero_stage < 2:
            raise ValueError(f"deepspeed.offload_optimizer=true needs deepspeed.zero_stage 2 or 3, not {self.zero_stage}")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"deepspeed.offload_params=true needs deepspeed.zero_stage=3, not {self.zero_stage}")
        if str(self.bf16).lower() not in ("auto", "true", "false"):
            raise ValueError(f"deepspeed.bf16={self.bf16!r}; allowed: auto, true, false")
        if self.context_parallel < 1:
            raise ValueError(f"deepspeed.context_parallel={self.context_parallel}; allowed: a whole number >= 1")


def use_bf16(cfg: DeepSpeedConfig, accelerator_present: bool | None = None) -> bool:
    """bf16 on or off; `auto` means on where a CUDA device supports it (pass True to plan for GPUs)."""
    value = str(cfg.bf16).lower()
    if value == "auto":
        if accelerator_present is None:
            accelerator_present = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return accelerator_present
    return value == "true"


def build_ds_config(cfg: DeepSpeedConfig, *, micro_batch: int, grad_accum: int, world_size: int, lr: float,
                    weight_decay: float, grad_clip: float, bf16: bool) -> dict:
    """The DeepSpeed config dict (pure: no process group, no devices)."""
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": weight_decay, "torch_adam": cfg.torch_adam}},
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); a plain `python` start becomes a 1-process group."""
    import deepspeed

    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(29500 + os.getpid() % 1000)
    # The CPU accelerator otherwise JIT-builds a shared-memory collective (~23 s) that training never uses.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def context_parallel_group(size: int):
    """(the process group of this rank's context-parallel ranks, its rank in it, its data-parallel rank): DeepSpeed's
    sequence-parallel groups of `size` consecutive ranks, made once per process. Size 1: (None, 0, rank)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if size == 1:
        return None, 0, rank
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as sp

    if sp._SEQUENCE_PARALLEL_GROUP is None:
        sp.initialize_sequence_parallel(size)
    return sp.get_sequence_parallel_group(), sp.get_sequence_parallel_rank(), rank // size


class GroupCollectives:
    """The collectives context parallelism runs on its group, handed to the model's `ContextParallel` (model code
    never imports torch.distributed)."""

    _all_gather = staticmethod(getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)
    _reduce_scatter = staticmethod(getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)

    def all_gather(self, out: torch.Tensor, x: torch.Tensor, group) -> None:
        """out [size * B, ...] <- every rank's x [B, ...], rank-major."""
        self._all_gather(out, x, group=group)

    def reduce_scatter(self, out: torch.Tensor, x: torch.Tensor, group) -> None:
        """out <- this rank's slice of the sum over ranks of x (rank-major along dim 0)."""
        self._reduce_scatter(out, x, group=group)

    def all_reduce(self, x: torch.Tensor, group) -> None:
        dist.all_reduce(x, group=group)


def context_parallel_loss_scale(engine, size: int) -> float:
    """What each rank's loss is multiplied by before `engine.backward`, so that the gradient DeepSpeed keeps is the
    sum of the context-parallel shares averaged over data-parallel ranks. ZeRO-1/2 divide the summed gradients
    by the data-parallel ranks; ZeRO-3's reduce-scatter divides by every rank of its partition group (data x
    context parallel), which `size` makes up for. The context-parallel tests compare gradient norms and weights
    with one rank under both, so a DeepSpeed that changes this fails there."""
    return float(size) if size > 1 and engine.zero_optimization_stage() == 3 else 1.0


def initialize(model: torch.nn.Module, param_groups: list[dict], ds_config: dict, context_parallel: int = 1):
    """The DeepSpeed engine over `model`, optimising exactly `param_groups` (frozen parameters get no state).

    Under ZeRO-3, parameters a module reads from its submodules without calling them (MLA's absorbed
    kv_b_proj weight) are registered so that DeepSpeed gathers them for that module's forward.
    With context parallelism, DeepSpeed gets its sequence-parallel groups as the `mpu`: ZeRO then shards and
    reduces over all ranks, and averages gradients over the data-parallel ranks only (each rank's loss is its
    share of its sequence's).
    """
    import deepspeed

    mpu = None
    if context_parallel > 1:
        from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

        context_parallel_group(context_parallel)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups, config=ds_config,
                                                   mpu=mpu)
    if engine.zero_optimization_stage() == 3:
        for module, param in getattr(model, "external_parameters", lambda: [])():
            deepspeed.zero.register_external_parameter(module, param)
    return engine, optimizer


def state_dict_groups(engine, group_keys):
    """All ranks iterate it. Yields the model's state dict one group at a time (`group_keys(keys)` lists the
    groups, e.g. the export's: a decoder layer, or one tensor outside the layers) as CPU tensors on rank 0, and
    {} on the other ranks.

    Under ZeRO-3 each group's shards are gathered just for it, so no GPU holds more than one layer beyond its
    own shards and rank 0 holds one group in CPU memory (the export writes it before asking for the next)."""
    module = engine.module
    zero3 = engine.zero_optimization_stage() == 3
    state = module.state_dict(keep_vars=True)  # under ZeRO-3: the right names, the partitioned parameters
    for keys in group_keys(state):
        params = [state[k] for k in keys if isinstance(state[k], torch.nn.Parameter)]
        if zero3 and params:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                group = {k: state[k].detach().cpu().clone() for k in keys} if is_rank0() else {}
        else:
            group = {k: state[k].detach().cpu() for k in keys} if is_rank0() else {}
        yield group
