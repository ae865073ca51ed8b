"""run_stage(): build everything for one stage, then the training loop; train_step(): one optimizer step."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from train import checkpoint, engine as eng
from train.config import TrainConfig
from train.data import TokenPipeline, check_tokenizer_fits, ensure_generated, load_tokenizer
from train.metrics import MetricsLogger, peak_memory_gib
from train.model import ModelConfig, build_model
from train.model.hf import export_hf
from train.stages import STAGES, alignment_probe, compute_loss, param_groups


def lr_at(step: int, cfg) -> float:
    """Linear warm-up over lr_warmup_steps, then cosine from 1 to min_lr_ratio at the last step (a multiplier)."""
    if step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    span = max(1, cfg.steps - cfg.lr_warmup_steps)
    progress = min(1.0, (step - cfg.lr_warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def print_plan(cfg: TrainConfig, world_size: int) -> None:
    s = cfg.stage
    eng.print0(
        f"[plan] stage {s.name}: {s.steps:,} steps x {s.global_batch:,} sequences x {cfg.data.seq_len:,} tokens\n"
        f"[plan] tokens per step: {cfg.tokens_per_step():,}\n"
        f"[plan] tokens in stage: {cfg.tokens_per_step() * s.steps:,}"
        + (f" (capped by stage.max_tokens={s.max_tokens:,})" if s.max_tokens else "") + "\n"
        f"[plan] ranks: {world_size}, micro batch {s.micro_batch}, gradient accumulation {cfg.grad_accum(world_size)}"
    )


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
    starts = range(0, batch["input_ids"].shape[0], mb)
    per_micro, bad = [], []
    for i in starts:
        ids = batch["input_ids"][i : i + mb].to(engine.device)
        labels = batch["labels"][i : i + mb].to(engine.device)
        loss, metrics = compute_loss(model, stage, cfg.stage, ids, labels, forward=engine)
        per_micro.append(metrics)
        engine.backward(loss)
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
        # on the device (no host sync); times the micro-batches, as run_stage averages over them
        totals["train/grad_norm"] = torch.as_tensor(norm, device=engine.device).float() * len(per_micro)
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


def run_stage(cfg: TrainConfig, raw_cfg) -> None:
    rank, world, local_rank = eng.init_distributed()
    if cfg.run.dry_run:
        return dry_run(cfg, world)
    cfg.validate(world)
    stage = STAGES[cfg.stage.name]
    run_dir = Path(cfg.run.root) / cfg.run.name / stage.name
    ckpt_dir = run_dir / "ckpt"
    torch.manual_seed(cfg.run.seed)

    if eng.is_rank0():
        ensure_generated(cfg.data)
    eng.barrier()
    model_cfg = ModelConfig(**{**vars(cfg.model), "path": cfg.model_path()})
    model = build_model(model_cfg)
    model.activation_checkpointing = cfg.stage.activation_checkpointing
    model.keep_topk_for_recompute = not cfg.stage.recompute_topk
    tokenizer = load_tokenizer(cfg.data, model_cfg.path)
    check_tokenizer_fits(tokenizer, model.source_config["vocab_size"], cfg.data.tokenizer or model_cfg.path)
    data = TokenPipeline(cfg.data, tokenizer, rank=rank, world_size=world)
    data.prepare(build_missing=local_rank == 0)  # one tokenisation per node; its other ranks wait and share it

    groups = param_groups(model, stage, cfg.stage)
    base_lrs = [g["lr"] for g in groups]
    ds_config = eng.build_ds_config(cfg.deepspeed, micro_batch=cfg.stage.micro_batch,
                                    grad_accum=cfg.grad_accum(world), world_size=world, lr=cfg.stage.lr,
                                    weight_decay=cfg.stage.weight_decay, grad_clip=cfg.stage.grad_clip,
                                    bf16=eng.use_bf16(cfg.deepspeed))
    engine, _ = eng.initialize(model, groups, ds_config)
    model = engine.module

    step, tokens_total, skipped, skipped_in_row = 0, 0, 0, 0
    probe_ids, probe_topk = None, None  # a fixed micro-batch for the selection-overlap and recall probes
    if cfg.run.resume:
        state = checkpoint.resume(engine, ckpt_dir, world)
        if state is not None:
            step, tokens_total = state["step"], state["tokens_total"]
            skipped, skipped_in_row = state.get("skipped", 0), state.get("skipped_in_row", 0)
            data.load_state_dict(state["data"])
            probe_ids = state["probe_ids"].to(engine.device)
            probe_topk = [t.to(engine.device) for t in state["probe_topk"]] if state["probe_topk"] else None
            eng.print0(f"[resume] {ckpt_dir} at step {step}, {tokens_total:,} tokens")

    logger = MetricsLogger(run_dir, cfg.logging, f"{cfg.run.name}-{stage.name}",
                           OmegaConf.to_container(raw_cfg, resolve=True), enabled=eng.is_rank0())
    logger.truncate_after(step)
    if eng.is_rank0():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(raw_cfg, resolve=True))
    print_plan(cfg, world)
    trainable = sum(p.numel() for g in groups for p in g["params"])
    eng.print0(f"[model] {sum(p.numel() for p in model.parameters()):,} parameters, {trainable:,} trained "
               f"({', '.join(g['name'] for g in groups)})")

    def limit_reached() -> bool:
        return step >= cfg.stage.steps or (cfg.stage.max_tokens is not None and tokens_total >= cfg.stage.max_tokens)

    t_last, tokens_last = time.perf_counter(), tokens_total
    while not limit_reached():
        batch = data.next_batch(cfg.stage.global_batch)
        if probe_ids is None:
            probe_ids = batch["input_ids"][: cfg.stage.micro_batch].to(engine.device)
        totals, was_skipped = train_step(engine, model, stage, cfg, batch, lr_at(step, cfg.stage), base_lrs,
                                         step + 1)
        step += 1
        if was_skipped:
            skipped, skipped_in_row = skipped + 1, skipped_in_row + 1
            bad = ", ".join(k for k, v in totals.items() if not torch.isfinite(v).all()) or "gradient norm"
            eng.print0(f"[skip] step {step}: non-finite {bad}; update skipped ({skipped} so far, "
                       f"{skipped_in_row} in a row)")
            if skipped_in_row >= cfg.stage.max_skipped_steps:
                raise NonFiniteError(f"step {step}: {skipped_in_row} consecutive steps skipped for non-finite "
                                     f"values (stage.max_skipped_steps={cfg.stage.max_skipped_steps}); lower "
                                     "stage.lr or check the data, then relaunch")
        else:
            skipped_in_row = 0
        tokens_total += batch["global_tokens"]  # every rank builds the same global batch: no collective needed
        if step % cfg.stage.log_every == 0 or limit_reached():
            if stage.trains_indexer:
                probe, probe_topk = alignment_probe(model, stage, probe_ids, probe_topk)
                totals.update({k: v * cfg.grad_accum(world) for k, v in probe.items()})  # averaged below
            keys = sorted(totals)
            summed = eng.all_reduce_sum(torch.stack([totals[k] for k in keys]))
            n_micro = cfg.grad_accum(world) * world
            metrics = {k: v / n_micro for k, v in zip(keys, summed.tolist())}
            now = time.perf_counter()
            metrics.update({
                "lr": base_lrs[-1] * lr_at(step - 1, cfg.stage),
                "tokens/step": batch["global_tokens"],
                "tokens/total": tokens_total,
                "perf/tokens_per_sec": (tokens_total - tokens_last) / max(now - t_last, 1e-9),
                "mem/peak_gib": peak_memory_gib(),
                "data/epoch": max(data.epochs),
                "train/skipped_steps": skipped,
            })
            t_last, tokens_last = now, tokens_total
            logger.log(step, metrics)
            logger.progress(step, cfg.stage.steps, metrics)
        if step % cfg.stage.save_every == 0 or limit_reached():
            checkpoint.save(engine, ckpt_dir, step, {"step": step, "tokens_total": tokens_total,
                                                     "data": data.state_dict(), "world_size": world,
                                                     "skipped": skipped, "skipped_in_row": skipped_in_row,
                                                     "stage": stage.name, "probe_ids": probe_ids.cpu(),
                                                     "probe_topk": [t.cpu() for t in probe_topk or []]},
                            keep_last=cfg.stage.keep_last, world_size=world)
    logger.close()
    weights = eng.state_dict_groups(engine)  # ZeRO-3 gathers one layer at a time: every rank takes part
    if eng.is_rank0():
        export_hf(model, run_dir / "export", tokenizer=tokenizer, dense_only=stage.name == "base", groups=weights,
                  log=eng.print0)
    else:
        for _ in weights:
            pass
    eng.print0(f"[done] {stage.name}: {step} steps, {tokens_total:,} tokens; export in {run_dir / 'export'}")
    eng.barrier()

