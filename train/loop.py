"""run_stage(): build everything for one stage, then the training loop; train_step(): one optimizer step."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from train import checkpoint, ops
from train import engine as eng
from train.checkpoint import TrainState
from train.config import TrainConfig
from train.data import (
    TokenPipeline,
    check_tokenizer_fits,
    ensure_generated,
    load_tokenizer,
)
from train.evaluation import eval_sums, summarize
from train import metrics as M
from train.metrics import MetricsLogger, peak_memory_gib
from train.model import ModelConfig, build_model
from train.model.context import ContextParallel
from train.export import export_stage
from train.run_dir import RunDir
from train.stages import STAGES, alignment_probe, compute_loss, param_groups, settle_metrics


def lr_at(step: int, cfg) -> float:
    """Linear warm-up over lr_warmup_steps, then cosine from 1 to min_lr_ratio at the last step (a multiplier)."""
    if step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    span = max(1, cfg.steps - cfg.lr_warmup_steps)
    progress = min(1.0, (step - cfg.lr_warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def print_plan(cfg: TrainConfig, world_size: int, model) -> None:
    """The stage's sizes as they will run: preset, steps, batch, sequence length, learning rate and schedule,
    the indexer and its top-k."""
    s = cfg.stage
    schedule = ("constant" if s.min_lr_ratio == 1 else f"cosine to {s.min_lr_ratio:g}x") + (
        f" after {s.lr_warmup_steps} warm-up steps" if s.lr_warmup_steps else "")
    lrs = f"lr {s.lr:g}" + (f", indexer lr {s.indexer_lr:g}" if s.indexer_lr else "")
    eng.print0(
        f"[plan] preset {cfg.preset.get('name', '-')}, stage {s.name}: {s.steps:,} steps x {s.global_batch:,} "
        f"sequences x {cfg.data.seq_len:,} tokens; {lrs}, {schedule}\n"
        f"[plan] tokens per step: {cfg.tokens_per_step():,}\n"
        f"[plan] tokens in stage: {cfg.tokens_per_step() * s.steps:,}"
        + (f" (capped by stage.max_tokens={s.max_tokens:,})" if s.max_tokens else "") + "\n"
        f"[plan] ranks: {world_size}"
        + (f" ({cfg.data_parallel(world_size)} data-parallel x {cfg.deepspeed.context_parallel} context-parallel)"
           if cfg.deepspeed.context_parallel > 1 else "")
        + f", micro batch {s.micro_batch}, gradient accumulation {cfg.grad_accum(world_size)}"
        f"\n[plan] indexer: {model.index_n_heads} heads x {model.index_head_dim}, top-{model.index_topk} of "
        f"{cfg.data.seq_len:,}\n"
        f"[plan] kernels: DSA_KERNELS={ops.backend()}; {model.layers[0].self_attn.sparse_kernels()}; "
        f"indexer top-k: {_index_dtype(model)}"
    )


def _index_dtype(model) -> str:
    """The indexer top-k's arithmetic, as the dispatch point resolves `model.index_dtype` on the model's device."""
    indexer = model.layers[0].self_attn.indexer
    fp8 = ops.index_fp8(indexer.index_dtype, indexer.wk.weight)
    return f"{'fp8' if fp8 else 'in the weights dtype'} (model.index_dtype={indexer.index_dtype})"


def dry_run(cfg: TrainConfig, world_size: int) -> None:
    """The plan of `cfg` for `run.plan_gpus` GPUs (default: this launch's ranks), from shapes only."""
    from train.plan import format_plan, make_plan

    world = cfg.run.plan_gpus or world_size
    cfg.validate(world)
    eng.print0(format_plan(make_plan(cfg, world)))


class NonFiniteError(RuntimeError):
    """A loss term or the gradient norm is NaN or infinite; the message names the step and the term."""


def nonfinite_terms(per_micro: list[dict[str, torch.Tensor]]) -> list[str]:
    """The non-finite loss terms of a step on any rank (kl_per_layer/<i> names the layer).

    One scalar all-reduce and one host sync per step, so every rank takes the same decision.
    """
    values = torch.stack([v.float() for metrics in per_micro for v in metrics.values()])
    flag = eng.all_reduce_sum((~torch.isfinite(values)).any().float().reshape(1))
    if float(flag) == 0:
        return []
    local = [f"{k} = {v.item()}" for metrics in per_micro for k, v in metrics.items() if not torch.isfinite(v).all()]
    return list(dict.fromkeys(local)) or ["loss on another rank"]


def train_step(engine, model, stage, cfg: TrainConfig, batch: dict, lr_scale: float, base_lrs: list[float],
               step: int):
    """One optimizer step over the rank's share of a global batch.

    Returns the summed per-micro-batch metrics and whether the update was skipped. A non-finite loss term
    or gradient norm stops the run (stage.on_nonfinite=stop: NonFiniteError before the update) or skips the
    update (on_nonfinite=skip: the ZeRO optimizer discards the gradients and leaves the Adam state alone).
    """
    for group, base in zip(engine.optimizer.param_groups, base_lrs):
        group["lr"] = base * lr_scale
    mb = cfg.stage.micro_batch
    loss_scale = eng.context_parallel_loss_scale(engine, model.context_parallel.size)
    starts = range(0, batch["input_ids"].shape[0], mb)
    per_micro, bad = [], []
    for i in starts:
        ids = batch["input_ids"][i : i + mb].to(engine.device)
        labels = batch["labels"][i : i + mb].to(engine.device)
        loss, metrics = compute_loss(model, stage, cfg.stage, ids, labels, forward=engine)
        engine.backward(loss * loss_scale if loss_scale != 1 else loss)
        per_micro.append(settle_metrics(model, stage, cfg.stage, metrics))
        if i == starts[-1]:  # the accumulation boundary: the next engine.step() updates the weights
            bad = nonfinite_terms(per_micro)
            if bad and cfg.stage.on_nonfinite == "stop":
                raise NonFiniteError(f"step {step}: non-finite {', '.join(bad)} (kl_per_layer/<i> names the "
                                     "layer); the last checkpoint is intact: lower stage.lr or check the data, "
                                     "then relaunch (or set stage.on_nonfinite=skip)")
        engine.step()
    totals = {k: sum(m[k].float() for m in per_micro) for k in per_micro[0]}
    norm = engine.get_global_grad_norm()
    if norm is not None:
        # on the device (no host sync); times the micro-batches, as run_stage averages over them; every rank of a
        # context-parallel group has the same norm, so each adds its share
        totals[M.GRAD_NORM] = (torch.as_tensor(norm, device=engine.device).float() * len(per_micro)
                              / model.context_parallel.size)
    if engine.was_step_applied():
        if bad:
            raise NonFiniteError(f"step {step}: non-finite {', '.join(bad)}, and the optimizer applied the update; "
                                 "stage.on_nonfinite=skip needs a ZeRO optimizer (deepspeed.zero_stage 1-3)")
        return totals, False
    if cfg.stage.on_nonfinite == "stop":  # finite losses, but the optimizer found a NaN/inf gradient
        raise NonFiniteError(f"step {step}: non-finite gradient norm ({norm}); the update was discarded and the "
                             "last checkpoint is intact: lower stage.lr, then relaunch (or set "
                             "stage.on_nonfinite=skip)")
    return totals, True


def build(cfg: TrainConfig, stage, rank: int, world: int, local_rank: int):
    """(engine, model, tokenizer, data pipeline, optimizer groups) of a stage, from its config."""
    if eng.is_rank0():
        ensure_generated(cfg.data)
    eng.barrier()
    model_cfg = ModelConfig(**{**vars(cfg.model), "path": cfg.model_path()})
    model = build_model(model_cfg)
    # One compute dtype for parameters, buffers, the indexer and the kernels' inputs: bf16 where DeepSpeed's bf16
    # is on (its optimizer keeps fp32 master weights), else fp32 (Adam's updates would round away in bf16).
    # The export writes the checkpoint's own dtype back.
    model.weights_dtype = next(model.parameters()).dtype
    model.to(torch.bfloat16 if eng.use_bf16(cfg.deepspeed) else torch.float32)
    model.activation_checkpointing = cfg.stage.activation_checkpointing
    model.keep_topk_for_recompute = not cfg.stage.recompute_topk
    # Context parallelism: the ranks of a group read the same sequences and each computes its share of them.
    cp = cfg.deepspeed.context_parallel
    cp_group, cp_rank, dp_rank = eng.context_parallel_group(cp)
    model.context_parallel = ContextParallel(cp_group, cp_rank, cp, eng.GroupCollectives())
    tokenizer = load_tokenizer(cfg.data, model_cfg.path)
    check_tokenizer_fits(tokenizer, model.source_config["vocab_size"], cfg.data.tokenizer or model_cfg.path)
    data = TokenPipeline(cfg.data, tokenizer, rank=dp_rank, world_size=cfg.data_parallel(world))
    data.prepare(build_missing=local_rank == 0)  # one tokenisation per node; its other ranks wait and share it
    groups = param_groups(model, stage, cfg.stage)
    ds_config = eng.build_ds_config(cfg.deepspeed, micro_batch=cfg.stage.micro_batch,
                                    grad_accum=cfg.grad_accum(world), world_size=cfg.data_parallel(world),
                                    lr=cfg.stage.lr, weight_decay=cfg.stage.weight_decay,
                                    grad_clip=cfg.stage.grad_clip, bf16=eng.use_bf16(cfg.deepspeed))
    engine, _ = eng.initialize(model, groups, ds_config, cp)
    return engine, engine.module, tokenizer, data, groups


def held_out_batches(cfg: TrainConfig, tokenizer, rank: int, world: int, local_rank: int, device) -> list[dict]:
    """This rank's share of `stage.eval_sequences` held-out sequences (`data.held_out`), the same at every
    evaluation; [] when `stage.eval_every` is 0."""
    if not cfg.stage.eval_every:
        return []
    dp = cfg.data_parallel(world)
    pipe = TokenPipeline(cfg.data.held_out_config(), tokenizer, rank=rank // cfg.deepspeed.context_parallel,
                         world_size=dp)
    pipe.prepare(build_missing=local_rank == 0)
    per_batch = dp * cfg.stage.micro_batch
    batches = [pipe.next_batch(per_batch) for _ in range(max(1, cfg.stage.eval_sequences // per_batch))]
    return [{k: b[k].to(device) for k in ("input_ids", "labels")} for b in batches]


def held_out_metrics(model, stage, cfg: TrainConfig, batches: list[dict]) -> dict[str, float]:
    """`eval/*`: dense (and, with an indexer, sparse) LM loss, indexer KL and recall on the held-out batches of
    all ranks (one all-reduce of the sums)."""
    with_indexer = stage.name != "base"
    distance = cfg.data.synthetic.recall_distance if cfg.data.synthetic else None
    sums = eval_sums(model, batches, None, with_indexer, distance)
    keys = sorted(sums)
    total = eng.all_reduce_sum(torch.stack([sums[k] for k in keys]))
    return {M.EVAL + k: v for k, v in summarize(dict(zip(keys, total)), with_indexer).items()}


def log_metrics(logger: MetricsLogger, state: TrainState, totals: dict, batch: dict, n_micro: int, lr: float,
                since: tuple[float, int], extra: dict[str, float]) -> tuple[float, int]:
    """Averages the step's summed metrics over all micro-batches of all ranks (one all-reduce), adds the counters
    and `extra`, logs them; returns the (time, tokens) the next interval's throughput counts from."""
    keys = sorted(totals)
    summed = eng.all_reduce_sum(torch.stack([totals[k] for k in keys]))
    metrics = {k: v / n_micro for k, v in zip(keys, summed.tolist())} | extra
    now = time.perf_counter()
    metrics.update({
        M.LR: lr,
        M.TOKENS_STEP: batch["global_tokens"],
        M.TOKENS_TOTAL: state.tokens_total,
        M.TOKENS_PER_SEC: (state.tokens_total - since[1]) / max(now - since[0], 1e-9),
        M.PEAK_MEMORY: peak_memory_gib(),
        M.EPOCH: max(state.data.epochs),
        M.SKIPPED_STEPS: state.skipped,
    })
    logger.log(state.step, metrics)
    logger.progress(state.step, metrics)
    return now, state.tokens_total


def write_report(run_dir: Path) -> None:
    """The stage's curves in run_dir/report.png (train/report.py); a plotting failure is a warning, never the
    run's failure."""
    try:
        from train.report import draw

        print(f"[report] wrote {draw([run_dir], run_dir / 'report.png')}", flush=True)
    except Exception as e:  # noqa: BLE001 -- curves are a convenience: the trained model is already exported
        print(f"[report] warning: no report.png ({type(e).__name__}: {e})", flush=True)


def count_skip(state: TrainState, was_skipped: bool, totals: dict, cfg: TrainConfig) -> None:
    if not was_skipped:
        state.skipped_in_row = 0
        return
    state.skipped, state.skipped_in_row = state.skipped + 1, state.skipped_in_row + 1
    bad = ", ".join(k for k, v in totals.items() if not torch.isfinite(v).all()) or "gradient norm"
    eng.print0(f"[skip] step {state.step}: non-finite {bad}; update skipped ({state.skipped} so far, "
               f"{state.skipped_in_row} in a row)")
    if state.skipped_in_row >= cfg.stage.max_skipped_steps:
        raise NonFiniteError(f"step {state.step}: {state.skipped_in_row} consecutive steps skipped for non-finite "
                             f"values (stage.max_skipped_steps={cfg.stage.max_skipped_steps}); lower stage.lr or "
                             "check the data, then relaunch")


def run_stage(cfg: TrainConfig, raw_cfg) -> None:
    """Build, resume, train until the stage's limit, export."""
    rank, world, local_rank = eng.init_distributed()
    if cfg.run.dry_run:
        return dry_run(cfg, world)
    cfg.validate(world)
    cfg.check_source()
    stage = STAGES[cfg.stage.name]
    run = RunDir.of(cfg.run.root, cfg.run.name, stage.name)
    run_dir, ckpt_dir = run.path, run.ckpt
    lock = run.claim()  # noqa: F841 -- held until the process ends
    run.start(cfg.run.resume, cfg.run.allow_config_change, OmegaConf.to_container(raw_cfg, resolve=True),
              (ckpt_dir / checkpoint.LATEST).is_file())
    eng.barrier()
    torch.manual_seed(cfg.run.seed)
    engine, model, tokenizer, data, groups = build(cfg, stage, rank, world, local_rank)
    held_out = held_out_batches(cfg, tokenizer, rank, world, local_rank, engine.device)
    base_lrs = [g["lr"] for g in groups]

    state = TrainState(stage=stage.name, world_size=world, data=data)
    if cfg.run.resume and checkpoint.resume(engine, ckpt_dir, state):
        eng.print0(f"[resume] {ckpt_dir} at step {state.step}, {state.tokens_total:,} tokens")
    logger = MetricsLogger(run_dir, cfg.logging, f"{cfg.run.name}-{stage.name}",
                           OmegaConf.to_container(raw_cfg, resolve=True), enabled=eng.is_rank0(),
                           total_steps=cfg.stage.steps)
    logger.truncate_after(state.step)
    run.keep_config(raw_cfg, state.step)
    print_plan(cfg, world, model)
    trainable = sum(p.numel() for g in groups for p in g["params"])
    eng.print0(f"[model] {sum(p.numel() for p in model.parameters()):,} parameters, {trainable:,} trained "
               f"({', '.join(g['name'] for g in groups)})")

    def limit_reached() -> bool:
        s = cfg.stage
        return state.step >= s.steps or (s.max_tokens is not None and state.tokens_total >= s.max_tokens)

    since = started = (time.perf_counter(), state.tokens_total)
    while not limit_reached():
        batch = data.next_batch(cfg.stage.global_batch)
        if state.probe_ids is None:
            state.probe_ids = batch["input_ids"][: cfg.stage.micro_batch].to(engine.device)
        totals, was_skipped = train_step(engine, model, stage, cfg, batch, lr_at(state.step, cfg.stage), base_lrs,
                                         state.step + 1)
        state.step += 1
        count_skip(state, was_skipped, totals, cfg)
        state.tokens_total += batch["global_tokens"]  # every rank builds the same global batch: no collective
        if state.step % cfg.stage.log_every == 0 or limit_reached():
            if stage.trains_indexer:
                probe, state.probe_topk = alignment_probe(model, stage, state.probe_ids, state.probe_topk or None)
                totals.update({k: v * cfg.grad_accum(world) for k, v in probe.items()})  # averaged below
            evaluate_now = held_out and (state.step % cfg.stage.eval_every == 0 or limit_reached())
            extra = held_out_metrics(model, stage, cfg, held_out) if evaluate_now else {}
            since = log_metrics(logger, state, totals, batch, cfg.grad_accum(world) * cfg.data_parallel(world),
                                base_lrs[-1] * lr_at(state.step - 1, cfg.stage), since, extra)
        if state.step % cfg.stage.save_every == 0 or limit_reached():
            checkpoint.save(engine, ckpt_dir, state, keep_last=cfg.stage.keep_last)
    logger.close()
    eng.print0(logger.summary(stage.name, state.tokens_total - started[1], time.perf_counter() - started[0]))
    export_stage(engine, model, stage, tokenizer, run.export, cfg.model_path())
    eng.print0(f"[done] {stage.name}: {state.step} steps, {state.tokens_total:,} tokens; export in {run.export}")
    if eng.is_rank0():
        write_report(run_dir)
    eng.barrier()
