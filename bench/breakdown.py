"""`--breakdown`: where a training step's GPU time goes, and what the step would take if each part ran at its
anchor's rate.

One extra run of the step under torch.profiler. For the profiled run only, the dispatch functions the model
calls (`train.ops.indexer_topk`, `sparse_mla`, ...) are wrapped in `record_function` ranges named `dsa::<op>`;
each GPU kernel's time is then given to the first thing it recognises on the way up from the op that launched it:

  indexer top-k                       dsa::indexer_topk
  indexer KL                          dsa::sparse_indexer_kl / dsa::dense_indexer_kl, or their backward
  sparse attention forward            dsa::absorbed_sparse_mla / sparse_mla / sparse_gqa, outside any backward
  sparse attention recomputation      the same inside a backward (activation checkpointing's recomputation)
  sparse attention backward           the sparse attention's own backward (with the latent outputs it rebuilds)
  dense attention                     SDPA and its backward (the dense and warm-up steps)
  GEMMs: projections, MLP, LM head    every other matmul (aten::mm, addmm, bmm, ...)
  everything else                     norms, RoPE, elementwise, the loss, the optimizer, copies
  GPU idle                            the step's wall time minus all kernel time (launch gaps, host work)

The bound: each part at its anchor's rate (ANCHORS: GEMMs at the bf16 matmul rate measured in the same run,
the indexer's logits at the FP8 (or bf16) matmul rate, sparse MLA's forward at FlashMLA's goal and its backward
at cuDNN's best measured rate), with "everything else" as measured and no idle time."""

from __future__ import annotations

import contextlib
import functools

import torch

from bench.common import TOPK, measure

OPS = ("indexer_topk", "dense_indexer_kl", "sparse_indexer_kl", "absorbed_sparse_mla", "sparse_mla", "sparse_gqa")
PARTS = ("GEMMs: projections, MLP, LM head", "indexer top-k", "indexer KL", "sparse attention forward",
         "sparse attention recomputation", "sparse attention backward", "dense attention", "everything else",
         "GPU idle")
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_scaled_mm"}
# Sparse MLA rates (TFLOP/s) the bound takes: FlashMLA's forward goal, cuDNN's backward as measured on the H200 at 32K.
ANCHORS = {"sparse_mla_fwd": 600.0, "sparse_mla_bwd": 378.0}
TOP_REST = 8  # "everything else"'s largest entries listed beside the parts


@contextlib.contextmanager
def labelled_ops():
    """Within: each dispatch function of OPS runs inside `record_function("dsa::<name>")`."""
    from train import ops

    saved = {name: getattr(ops, name) for name in OPS}

    def labelled(name, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with torch.profiler.record_function(f"dsa::{name}"):
                return fn(*args, **kwargs)
        return run
    for name, fn in saved.items():
        setattr(ops, name, labelled(name, fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)


def classify(chain: list[str]) -> str:
    """The part of a kernel launched by the op chain[0], inside chain[1], chain[2], ... (innermost first)."""
    backward = any("Backward" in n or "evaluate_function" in n for n in chain)
    for i, name in enumerate(chain):
        if name == "dsa::indexer_topk":
            return "indexer top-k"
        if name in ("dsa::sparse_indexer_kl", "dsa::dense_indexer_kl") or "IndexerKLBackward" in name:
            return "indexer KL"
        if name in ("dsa::absorbed_sparse_mla", "dsa::sparse_mla", "dsa::sparse_gqa"):
            return "sparse attention recomputation" if backward else "sparse attention forward"
        if any(f"{f}Backward" in name for f in ("AbsorbedSparseMLA", "SparseMLA", "SparseGQA")):
            return "sparse attention backward"
        if "scaled_dot_product" in name or "FlashAttentionBackward" in name or "EfficientAttentionBackward" in name:
            return "dense attention"
    return "GEMMs: projections, MLP, LM head" if chain[0] in GEMM_OPS else "everything else"


def profile_step(step) -> dict:
    """{part: GPU ms} of one run of `step`, and the run's wall time ("step")."""
    import time

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with labelled_ops(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) * 1e3
    return parts_of(prof.events(), wall)


def parts_of(events, wall: float) -> dict:
    """{part: GPU ms} of profiler `events` (FunctionEvents) of a step that took `wall` ms: each GPU activity
    (kernel, copy, fill) once, given to the part named by the chain of the op it is listed under (the profiler
    lists each activity under the innermost op or annotated range open at its launch: a Triton, TileLang or
    cuDNN kernel launched from Python sits under the `dsa::` range itself); not the GPU span of an annotated
    range, which the profiler lists under the range with the range's name and which covers kernels counted
    already."""
    from torch.autograd import DeviceType

    parts = dict.fromkeys(PARTS, 0.0)
    rest: dict[str, float] = {}  # "everything else" by launching op and kernel, for its top entries
    for e in events:
        if e.device_type != DeviceType.CPU:
            continue
        chain, p = [], e
        while p is not None:
            chain.append(p.name)
            p = p.cpu_parent
        for k in e.kernels:
            if k.name != e.name:  # a range's own GPU span bears its name
                part = classify(chain)
                parts[part] += k.duration / 1e3
                if part == "everything else":
                    key = f"{' < '.join(chain[:3])}: {k.name[:60]}"
                    rest[key] = rest.get(key, 0.0) + k.duration / 1e3
    busy = sum(parts.values())
    parts["GPU idle"] = max(0.0, wall - busy)
    top = dict(sorted(((k, round(v, 1)) for k, v in rest.items()), key=lambda kv: -kv[1])[:TOP_REST])
    return {"step": wall, **parts, "gpu_busy": busy, "everything else, top": top}


def fp8_matmul_tflops(iters: int = 5) -> float | None:
    """The GPU's FP8 (e4m3) matmul rate, 8192^3 with per-tensor scales; None where it does not run."""
    try:
        a = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn).t()
        one = torch.ones((), device="cuda")
        r = measure(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), iters)
    except Exception:  # noqa: BLE001 -- no FP8 tensor cores here
        return None
    return 2 * 8192**3 / (r["ms"] * 1e-3) / 1e12


def step_flops(model, L: int, stage: str, fp8: bool) -> dict:
    """FLOPs per part of one step of `model` on L tokens (activation checkpointing: the forward runs twice)."""
    cfg = model.source_config
    layers = len(model.layers)
    embed = model.model.embed_tokens.weight.numel()
    linear = sum(p.numel() for p in model.parameters() if p.dim() == 2) - embed
    G, D = model.index_n_heads, model.index_head_dim
    causal = L * (L + 1) / 2
    selected = TOPK * L - TOPK * (TOPK - 1) / 2 if L >= TOPK else causal
    # dense and sparse: forward, its recomputation, backward (2x); warm-up: the frozen backbone's forward only
    out = {"GEMMs: projections, MLP, LM head": (2 if stage == "warmup" else 8) * linear * L,
           "indexer top-k": 2 * layers * G * D * causal, "fp8": fp8}
    if stage == "sparse" and cfg.get("kv_lora_rank"):
        H, A, R = cfg["num_attention_heads"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
        f = 2 * H * selected * (A + R + A)
        # checkpointed: the forward computes no probabilities (the KL takes the recomputation's, one pass)
        out.update({"sparse attention forward": f * layers,
                    "sparse attention recomputation": 1.5 * f * layers,
                    "sparse attention backward": 3.5 * f * layers,  # the latent outputs again, and the backward
                    "indexer KL": 6 * G * D * selected * layers})
    return out


def bound(parts: dict, flops: dict, bf16_tflops: float, fp8_tflops: float | None) -> dict:
    """The step if each part ran at its anchor's rate; "everything else" as measured, no idle time."""
    rate = {"GEMMs: projections, MLP, LM head": bf16_tflops,
            "indexer top-k": fp8_tflops if flops.get("fp8") and fp8_tflops else bf16_tflops,
            "indexer KL": bf16_tflops,
            "sparse attention forward": ANCHORS["sparse_mla_fwd"],
            "sparse attention recomputation": ANCHORS["sparse_mla_fwd"]}
    anchored = {}
    for part, ms in parts.items():
        if part in ("step", "GPU idle", "gpu_busy", "everything else, top"):
            continue
        if part == "sparse attention backward" and part in flops:
            f = flops[part]  # its first 1 / 3.5 is the latent outputs' forward
            anchored[part] = (f / 3.5 / ANCHORS["sparse_mla_fwd"] + f * 2.5 / 3.5 / ANCHORS["sparse_mla_bwd"]) / 1e9
        elif part in flops and part in rate:
            anchored[part] = flops[part] / rate[part] / 1e9  # FLOPs / (TFLOP/s) -> ms
        else:
            anchored[part] = ms  # measured: no anchor
    return {"parts": anchored, "step": sum(anchored.values())}


def breakdown_table(rows: list[dict]) -> str:
    """Markdown: one row per (model, L, step), each part's ms and share of the step, and the bound."""
    rows = [r for r in rows if "breakdown" in r]
    if not rows:
        return ""
    lines = ["| model | L | step | " + " | ".join(PARTS) + " | bound (anchored parts) |",
             "|---|---|---|" + "---|" * (len(PARTS) + 1)]
    for r in rows:
        b = r["breakdown"]
        cells = [f"{b[p]:,.0f} ({b[p] / b['step']:.0%})" if b[p] >= 0.5 else "" for p in PARTS]
        bnd = r.get("bound", {}).get("step")
        tail = f" | {bnd:,.0f} ms |" if bnd else " | |"
        lines.append(f"| {r.get('model', '')} | {r['L']:,} | {r['name']}: {b['step']:,.0f} ms | " + " | ".join(cells)
                     + tail)
    return "\n".join(lines)
