"""`make bench` (GPU): the DSA kernels next to their PyTorch twins and SDPA, then whole training steps.

python -m train.bench [--lengths 8192 32768 65536 131072] [--e2e-lengths 32768 65536] [--out bench.json]

Kernels, at DeepSeek-V3's attention shape (128 heads, d_qk 576 = 512 + 64, d_v 512, indexer 64 x 128,
top-2048), batch 1, bf16: time (median of `--iters`), TFLOP/s and peak memory above the inputs.
  sparse_mla fwd / probs / bwd   the Triton kernels (FLOPs: 2*H*selected*(576+512) forward, 2.5x that
                                 backward, DSA.md §5; `selected` counts valid entries only), and the
                                 one-pass forward + probabilities of the checkpoint recomputation
  sparse_mla twin fwd+bwd        the chunked PyTorch reference (lengths <= --twin-max)
  sdpa fwd / fwd+bwd             torch SDPA, causal, MLA's dense shape (d_qk 192, d_v 128), 128 heads
  warmup_kl fwd+bwd              the warm-up loss kernel (KL to the head-averaged attention of 128 heads of
                                 d_qk 192, recall, the indexer's gradient), and its twin (lengths <= 8K)
  indexer_topk                   Triton logits + top-k, the chunked twin, and the plain PyTorch version
                                 (all-head einsum + topk; it runs out of memory past 16K)
End to end, a ~1B-parameter DeepSeek-V3-architecture model (bf16 weights, AdamW, activation checkpointing):
tokens/s and peak memory of a dense-attention step (all parameters), a warm-up step (indexer only, KL over
the full span) and a sparse step (top-k attention, LM + sparse indexer KL).
Bound (`--sections bound`): the fastest a sparse step could be against the dense step, from SDPA at the 1B
model's shape, the sparse MLA FLOPs and issue #7's kernel rates (see `bench_bound`).
Writes JSON to --out and prints a table; failures (out of memory) are recorded, not fatal.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from train import ops
from train.ops import reference

H, DV, DR, G, DI, TOPK = 128, 512, 64, 64, 128, 2048


def measure(fn, iters: int, warm: bool = True) -> dict:
    """Median wall time (ms) over `iters` runs after one warm-up run (unless not `warm`: the timed run then
    includes kernel compilation), peak memory above the start and in total (GiB; whatever was allocated
    before, e.g. the model and its optimizer state, counts in the total only)."""
    torch.cuda.synchronize()
    if warm:
        fn()
        torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    peak = torch.cuda.max_memory_allocated()
    return {"ms": sorted(times)[len(times) // 2], "peak_gib": (peak - base) / 2**30, "total_peak_gib": peak / 2**30}


PROFILE = {"on": False, "marks": False}


def profile(name: str, fn) -> None:
    """One extra run under torch.profiler: the GPU kernels that took the most time (`--profile`)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"  profile of {name}:\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=12,
                                                                 max_name_column_width=60), flush=True)


def guarded(name: str, fn, iters: int, flops: float | None = None, warm: bool = True) -> dict:
    try:
        r = measure(fn, iters, warm)
        if PROFILE["on"]:
            profile(name, fn)
        if flops:
            r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
    except torch.OutOfMemoryError:
        r = {"error": "out of memory"}
    except Exception as e:  # noqa: BLE001 -- a launch configuration the GPU cannot run (shared memory): record it
        r = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    torch.cuda.empty_cache()
    print(f"  {name}: {r}", flush=True)
    return {"name": name, **r}


def sparse_mla_flops(heads: int, selected: int) -> float:
    """Sparse MLA forward FLOPs (DSA.md §5): scores over d_qk (576) and values over d_v (512) for every valid
    (query, key) pair and head; the backward counts 2.5x this."""
    return 2 * heads * selected * (DV + DR + DV)


def causal_selection(L: int, k: int, device) -> torch.Tensor:
    """[1, L, k] random distinct-enough causal positions (row t draws from 0..t), -1 where t + 1 < k."""
    t = torch.arange(L, device=device)[:, None]
    idx = (torch.rand(L, k, device=device) * (t + 1)).long()
    j = torch.arange(k, device=device)[None, :]
    idx = torch.where(t + 1 >= k, idx, torch.where(j <= t, j, -1))
    return idx[None]


def bench_sparse_mla(L: int, iters: int, twin_max: int) -> list[dict]:
    dev = "cuda"
    q = torch.randn(1, L, H, DV + DR, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(1, L, DV + DR, device=dev, dtype=torch.bfloat16)
    idx = causal_selection(L, TOPK, dev)
    scale = (128 + 64) ** -0.5
    selected = int((idx >= 0).sum())
    fwd_flops = sparse_mla_flops(H, selected)
    from train.ops import triton_sparse_mla as k

    out, lse = k.sparse_mla_forward(q, kv, idx, scale, DV)
    g = torch.randn_like(out)
    rows = [guarded("sparse_mla fwd", lambda: k.sparse_mla_forward(q, kv, idx, scale, DV), iters, fwd_flops),
            guarded("sparse_mla probs", lambda: k.sparse_mla_probs(q, kv, idx, lse, scale, DV), iters,
                    2 * H * selected * (DV + DR)),
            guarded("sparse_mla bwd", lambda: k.sparse_mla_backward(q, kv, idx, out, lse, g, scale, DV), iters,
                    2.5 * fwd_flops),
            guarded("sparse_mla fwd+probs given lse", lambda: k.sparse_mla_forward_given_lse(q, kv, idx, lse, scale,
                                                                                          DV), iters, fwd_flops)]
    if L <= twin_max:
        qg, kvg = q.clone().requires_grad_(), kv.clone().requires_grad_()

        def twin():
            o = reference.sparse_mla(qg, kvg, idx, scale, DV)[0]
            torch.autograd.grad(o, (qg, kvg), g)
        rows.append(guarded("sparse_mla twin fwd+bwd", twin, max(1, iters // 3), 3.5 * fwd_flops))
    return rows


def bench_warmup_kl(L: int, iters: int, twin_max: int, label: str = "warmup_kl fwd+bwd") -> list[dict]:
    """The warm-up loss (forward + the indexer's backward) at DeepSeek-V3's shape: 128 heads of d_qk 192."""
    dev = "cuda"
    qi = torch.randn(1, L, G, DI, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ki = torch.randn(1, L, DI, device=dev, dtype=torch.bfloat16, requires_grad=True)
    wi = (torch.randn(1, L, G, device=dev) * (G * DI) ** -0.5).requires_grad_()
    qa = torch.randn(1, L, H, 192, device=dev, dtype=torch.bfloat16)
    ka = torch.randn(1, L, H, 192, device=dev, dtype=torch.bfloat16)
    from train.ops import triton_warmup_kl

    def run(fn):
        kl, _ = fn(qi, ki, wi, qa, ka, 192 ** -0.5, TOPK)
        torch.autograd.grad(kl.mean(), (qi, ki, wi))
    rows = [guarded(label, lambda: run(triton_warmup_kl.dense_indexer_kl), iters)]
    if L <= min(twin_max, 8192):  # the twin loops over 16-row blocks in Python: minutes past 8K
        rows.append(guarded("warmup_kl twin fwd+bwd", lambda: run(reference.dense_indexer_kl), max(1, iters // 3)))
    return rows


def bench_sdpa(L: int, iters: int, heads: int = H, label: str = "") -> list[dict]:
    """SDPA on MLA's dense (non-absorbed) shape: what the dense model runs."""
    dev = "cuda"
    qa = torch.randn(1, heads, L, 192, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ka = torch.randn(1, heads, L, 192, device=dev, dtype=torch.bfloat16, requires_grad=True)
    va = torch.randn(1, heads, L, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    sdpa_flops = 2 * heads * (L * (L + 1) / 2) * (192 + 128)

    def sdpa_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(qa, ka, va, is_causal=True)

    def sdpa_fwd_bwd():
        o = F.scaled_dot_product_attention(qa, ka, va, is_causal=True)
        o.backward(torch.ones_like(o))
    return [guarded(f"sdpa fwd{label}", sdpa_fwd, iters, sdpa_flops),
            guarded(f"sdpa fwd+bwd{label}", sdpa_fwd_bwd, iters, 3.5 * sdpa_flops)]


def bench_topk(L: int, iters: int, twin_max: int, plain_max: int) -> list[dict]:
    dev = "cuda"
    q = torch.randn(1, L, G, DI, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, L, DI, device=dev, dtype=torch.bfloat16)
    w = torch.randn(1, L, G, device=dev) * (G * DI) ** -0.5
    flops = 2 * G * DI * L * (L + 1) / 2
    from train.ops import triton_topk

    rows = [guarded("indexer_topk triton", lambda: triton_topk.indexer_topk(q, k, w, TOPK), iters, flops)]
    if L <= twin_max:
        rows.append(guarded("indexer_topk twin", lambda: reference.indexer_topk(q, k, w, TOPK), iters, flops))
    if L <= plain_max:
        # The plain version: the reference formula over the whole sequence at once (fp32), then topk.
        rows.append(guarded("indexer_topk plain pytorch fp32", lambda: reference.indexer_logits(q, k, w, 0).topk(
            TOPK, dim=-1).indices, iters, flops))

        def plain_bf16():  # the same in bf16 einsums: half the memory, faster
            scores = torch.einsum("btgd,bsd->btgs", q, k).relu()
            logits = torch.einsum("btgs,btg->bts", scores, w.to(scores.dtype))
            logits = logits.masked_fill(torch.ones(L, L, device=dev, dtype=torch.bool).triu(1), float("-inf"))
            return logits.topk(TOPK, dim=-1).indices
        rows.append(guarded("indexer_topk plain pytorch bf16", plain_bf16, iters, flops))
    return rows


def sweep(L: int, iters: int, kernels: list[str], heads: int = H) -> list[dict]:
    """Launch-configuration sweeps (`--sweep`): how the kernels' defaults were chosen, re-runnable on other GPUs.
    `heads`: the sparse MLA's head count (DeepSeek-V3's 128, or the 1B model's 16: one program per query)."""
    from train.ops import triton_sparse_mla as sm
    from train.ops import triton_warmup_kl as wk

    rows = []
    if "warmup_kl" in kernels:
        default = dict(wk.KL_CONFIG)
        for BT, BS, NS, warps in ((64, 64, 2, 4), (128, 64, 4, 8), (128, 64, 2, 8), (128, 128, 2, 8), (128, 32, 8, 4)):
            for stages in (2, 3):
                wk.KL_CONFIG = dict(BT=BT, BS=BS, NS=NS, num_warps=warps, num_stages=stages)
                rows += [{"L": L, "config": wk.KL_CONFIG, **r} for r in
                         bench_warmup_kl(L, iters, 0, label=f"warmup_kl {wk.KL_CONFIG}")]
        wk.KL_CONFIG = default
    if "sparse_mla_writes" in kernels:
        rows += sparse_mla_writes(L, iters, heads)
    if "sparse_mla" in kernels:
        q = torch.randn(1, L, heads, DV + DR, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(1, L, DV + DR, device="cuda", dtype=torch.bfloat16)
        idx = causal_selection(L, TOPK, "cuda")
        fwd_flops = sparse_mla_flops(heads, int((idx >= 0).sum()))
        out, lse = sm.sparse_mla_forward(q, kv, idx, 192 ** -0.5, DV)
        g = torch.randn_like(out)
        fwd = ((64, 64, 8, 2), (64, 32, 8, 2), (64, 64, 8, 1), (64, 64, 8, 3), (64, 32, 4, 2), (64, 128, 8, 2),
               (64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 16, 2), (128, 32, 16, 1), (128, 64, 16, 1))
        if heads <= 16:  # one head block of 16: only the key block, warps and stages matter
            fwd = tuple((16, BK, warps, stages) for BK in (32, 64, 128) for warps in (2, 4, 8) for stages in (2, 3))
        for BH, BK, warps, stages in fwd:
            cfg = dict(BH=BH, BK=BK, warps=warps, stages=stages)
            rows.append({"L": L, "config": cfg, **guarded(f"sparse_mla fwd {cfg}", lambda: sm.sparse_mla_forward(
                q, kv, idx, 192 ** -0.5, DV, **cfg), iters, fwd_flops)})
            rows.append({"L": L, "config": cfg, **guarded(f"sparse_mla probs {cfg}", lambda: sm.sparse_mla_probs(
                q, kv, idx, lse, 192 ** -0.5, DV, **cfg), iters)})
        bwd = [dict(BH=BH, BK=BK, warps=warps, stages=stages) for BH, BK, warps, stages in (
            (32, 32, 8, 2), (32, 32, 4, 2), (32, 64, 8, 2), (16, 32, 4, 2), (64, 32, 8, 2), (64, 16, 8, 2),
            (32, 16, 4, 2), (32, 32, 8, 1), (64, 32, 16, 2), (64, 16, 16, 2), (64, 32, 16, 1), (128, 16, 16, 1))]
        if heads <= 16:
            bwd = [dict(BH=16, BK=BK, warps=warps, stages=stages) for BK in (16, 32, 64) for warps in (2, 4, 8)
                   for stages in (1, 2)]
        for cfg in bwd:
            rows.append({"L": L, "config": cfg, **guarded(f"sparse_mla bwd {cfg}", lambda: sm.sparse_mla_backward(
                q, kv, idx, out, lse, g, 192 ** -0.5, DV, **cfg), iters, 2.5 * fwd_flops)})
    return rows


def window_selection(L: int, k: int, device) -> torch.Tensor:
    """[1, L, k]: row t selects t, t-1, ..., t-k+1 (-1 below 0): neighbouring rows share all but one row."""
    idx = torch.arange(L, device=device)[:, None] - torch.arange(k, device=device)[None, :]
    return idx.masked_fill(idx < 0, -1)[None]


def sparse_mla_writes(L: int, iters: int, heads: int) -> list[dict]:
    """What the sparse MLA backward's fp32 atomics cost (`--sweep sparse_mla_writes`): the default launch
    configuration with the latent-row gradients added atomically, stored (racy), or reduced to one number per
    row; with random selections (rows scattered over L) and with a sliding window (rows shared by neighbours).
    The forward is timed with both selections too: what its gathers cost when neighbours share rows in L2."""
    from train.ops import triton_sparse_mla as sm

    q = torch.randn(1, L, heads, DV + DR, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, L, DV + DR, device="cuda", dtype=torch.bfloat16)
    rows = []
    for selection, make in (("random", causal_selection), ("window", window_selection)):
        idx = make(L, TOPK, "cuda")
        fwd_flops = sparse_mla_flops(heads, int((idx >= 0).sum()))
        out, lse = sm.sparse_mla_forward(q, kv, idx, 192 ** -0.5, DV)
        g = torch.randn_like(out)
        cfg = {"heads": heads, "selection": selection}  # the forward too: does it wait on its gathers?
        rows.append({"L": L, "config": cfg, **guarded(f"sparse_mla fwd selection {cfg}", lambda: sm.sparse_mla_forward(
            q, kv, idx, 192 ** -0.5, DV), iters, fwd_flops)})
        for writes, what in ((0, "atomics"), (1, "stores"), (2, "one number per row")):
            if selection == "window" and writes:
                continue
            cfg = {"heads": heads, "selection": selection, "writes": what}
            def bwd():
                return sm.sparse_mla_backward(q, kv, idx, out, lse, g, 192 ** -0.5, DV, writes=writes)
            rows.append({"L": L, "config": cfg, **guarded(f"sparse_mla bwd writes {cfg}", bwd, iters, 2.5 * fwd_flops)})
    return rows


def compiled_stats() -> list[dict]:
    """Per compiled sparse MLA kernel: registers, spills, shared memory, and its tensor-core instructions in the
    PTX (Hopper's wgmma needs 64 rows per warpgroup in a tl.dot; smaller tiles fall back to mma.sync).
    Reads Triton's kernel cache (not a public API): an empty list if that changes."""
    import re

    from train.ops import triton_sparse_mla as sm

    stats = []
    for fn in (sm._sparse_mla_fwd_kernel, sm._sparse_mla_probs_kernel, sm._sparse_mla_bwd_kernel):
        try:
            compiled = list(fn.device_caches[torch.cuda.current_device()][0].values())
        except (AttributeError, IndexError, KeyError, TypeError):
            return []
        for ck in compiled:
            try:
                ptx = ck.asm["ptx"]
                stats.append({"kernel": fn.fn.__name__, "warps": ck.metadata.num_warps, "regs": ck.n_regs,
                              "spills": ck.n_spills, "shared_kib": ck.metadata.shared / 1024,
                              "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
                              "mma.sync": len(re.findall(r"mma\.sync", ptx))})
            except AttributeError:  # a configuration that failed to load (out of shared memory)
                continue
    return stats


def sweep_summary(rows: list[dict]) -> str:
    """The fastest configuration of each swept op (name up to its configuration), and how many failed."""
    best: dict[str, dict] = {}
    failed: dict[str, int] = {}
    for row in rows:
        op = row["name"].split(" {")[0]
        if "ms" not in row:
            failed[op] = failed.get(op, 0) + 1
        elif op not in best or row["ms"] < best[op]["ms"]:
            best[op] = row
    lines = ["| op | fastest configuration | ms | failed to run |", "|---|---|---|---|"]
    for op in sorted(set(best) | set(failed)):
        r = best.get(op)
        config, ms = (r["config"], f"{r['ms']:.2f}") if r else ("-", "-")
        lines.append(f"| {op} | {config} | {ms} | {failed.get(op, 0)} |")
    return "\n".join(lines)


ONE_B = dict(vocab_size=32768, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
             num_hidden_layers=18, first_k_dense_replace=18, n_routed_experts=8, n_shared_experts=1,
             num_experts_per_tok=2, n_group=1, topk_group=1, num_attention_heads=16, num_key_value_heads=16,
             q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
             max_position_embeddings=163840, tie_word_embeddings=False)


def mark(what: str) -> None:
    """`--memory-marks`: memory held at this point of a step (what stays allocated between phases)."""
    if PROFILE["marks"]:
        torch.cuda.synchronize()
        print(f"  [memory] {what}: {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated, "
              f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB peak so far", flush=True)


def bench_e2e(lengths: list[int], iters: int, warmup_max: int, stages: list[str], cold_from: int,
              recompute_topk: bool = False, index_heads: int = G, index_dim: int = DI) -> list[dict]:
    from train.model import ModelConfig, build_model
    from train.stages import STAGES, StageConfig, compute_loss, param_groups

    model = build_model(ModelConfig(arch=ONE_B, index_n_heads=index_heads, index_head_dim=index_dim, index_topk=TOPK,
                                    dtype="bfloat16")).cuda()
    model.activation_checkpointing = True
    model.keep_topk_for_recompute = not recompute_topk
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[e2e] {n_params / 1e9:.3f}B parameters ({sum(p.numel() for p in model.indexer_parameters()) / 1e6:.0f}M"
          " indexer)", flush=True)
    rows = []
    for L in lengths:
        ids = torch.randint(0, ONE_B["vocab_size"], (1, L), device="cuda")
        for name, stage_name in (("dense step", "base"), ("warm-up step", "warmup"), ("sparse step", "sparse")):
            if stage_name not in stages or (stage_name == "warmup" and L > warmup_max):
                continue
            stage = STAGES[stage_name]
            groups = param_groups(model, stage, StageConfig(name=stage_name, lr=1e-5))
            opt = torch.optim.AdamW([{"params": g["params"], "lr": g["lr"]} for g in groups])

            def step():
                loss, _ = compute_loss(model, stage, StageConfig(name=stage_name), ids, ids)
                mark(f"{name} L={L} after forward")
                loss.backward()
                mark(f"{name} L={L} after backward")
                opt.step()
                opt.zero_grad(set_to_none=True)
            cold = L >= cold_from  # long steps: one timed run, no warm-up run
            r = guarded(f"e2e {name} L={L}", step, 1 if cold else iters, warm=not cold)
            if "ms" in r:
                r["tokens_per_sec"] = L / (r["ms"] * 1e-3)
            rows.append({"L": L, **r})
            opt.state.clear()
            torch.cuda.empty_cache()
    rows.append({"name": "parameters", "total": n_params})
    return rows


# Issue #7's sparse MLA rates (TFLOP/s, forward / backward): its targets and its goals.
RATES = {"targets": (350, 150), "goals": (450, 250)}


def matmul_tflops(iters: int) -> float:
    """The GPU's bf16 matmul rate, 8192^3 (the ceiling any attention kernel's tensor-core work runs under)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    r = measure(lambda: a @ a, max(iters, 5))
    return 2 * 8192**3 / (r["ms"] * 1e-3) / 1e12


def sparse_bound(L: int, dense_ms: float, attention_ms: float, peak: float, layers: int, heads: int,
                 k: int = TOPK) -> dict:
    """The bound's arithmetic (see `bench_bound`): per rate pair, the sparse attention's time per step, the best
    speedup over the dense step, and how short the rest of the step would have to be for 3x (negative: no
    length is short enough)."""
    rest = dense_ms - attention_ms
    selected = k * L - k * (k - 1) // 2 if L >= k else L * (L + 1) // 2  # sum over t of min(t + 1, k)
    fwd_tflop = sparse_mla_flops(heads, selected) / 1e12
    row = {"name": f"bound L={L}", "L": L, "dense_step_ms": dense_ms, "dense_attention_ms": attention_ms,
           "rest_ms": rest, "matmul_tflops": peak, "rates": []}
    for what, (f, b) in [*RATES.items(), ("matmul peak", (peak, peak))]:
        sparse_attention = layers * (2 * fwd_tflop / f + 2.5 * fwd_tflop / b) * 1e3
        row["rates"].append({"rates": what, "fwd_tflops": f, "bwd_tflops": b, "sparse_attention_ms": sparse_attention,
                             "max_speedup": dense_ms / (rest + sparse_attention),
                             "rest_ms_for_3x": (attention_ms - 3 * sparse_attention) / 2})
    return row


def bench_bound(e2e: list[dict], iters: int) -> list[dict]:
    """The fastest a sparse step of the 1B model could be, next to its dense step measured in this run.
    The dense step = its attention (SDPA at the model's shape, timed here: forward + backward + the checkpoint
    recomputation's forward, times the layers) + the rest. The sparse step keeps the rest and swaps the
    attention for sparse MLA: at least 2 forwards (the step's and the recomputation's) and a backward of
    2*H*selected*(576 + 512) FLOPs each (backward 2.5x), at issue #7's target and goal rates and at the GPU's
    measured matmul rate. The indexer (logits, top-k, its loss) is left out: every bound here is generous."""
    layers, heads = ONE_B["num_hidden_layers"], ONE_B["num_attention_heads"]
    peak = matmul_tflops(iters)
    print(f"  bf16 matmul 8192^3: {peak:.0f} TFLOP/s", flush=True)
    rows = []
    for dense in (r for r in e2e if r.get("name", "").startswith("e2e dense step") and "ms" in r):
        L = dense["L"]
        sdpa = [r.get("ms") for r in bench_sdpa(L, iters, heads, label=f" ({heads} heads)")]  # fwd, fwd+bwd
        if None in sdpa:
            rows.append({"name": f"bound L={L}", "L": L, "error": "SDPA at the model's shape did not run"})
            continue
        rows.append({**sparse_bound(L, dense["ms"], layers * (sdpa[0] + sdpa[1]), peak, layers, heads),
                     "sdpa_fwd_ms": sdpa[0], "sdpa_fwd_bwd_ms": sdpa[1]})
        print(f"  {rows[-1]}", flush=True)
    return rows


def bound_table(rows: list[dict]) -> str:
    lines = ["| L | dense step | its attention | the rest | sparse rates (fwd / bwd TFLOP/s) | sparse attention | "
             "sparse step at best | speedup at best | the rest would have to take, for 3x |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for r in row.get("rates", []):
            need = f"{r['rest_ms_for_3x']:,.0f} ms" if r["rest_ms_for_3x"] > 0 else "less than nothing"
            lines.append(f"| {row['L']:,} | {row['dense_step_ms']:,.0f} ms | {row['dense_attention_ms']:,.0f} ms | "
                         f"{row['rest_ms']:,.0f} ms | {r['rates']} ({r['fwd_tflops']:.0f} / {r['bwd_tflops']:.0f}) | "
                         f"{r['sparse_attention_ms']:,.0f} ms | {row['rest_ms'] + r['sparse_attention_ms']:,.0f} ms | "
                         f"{r['max_speedup']:.2f}x | {need} |")
    return "\n".join(lines)


def table(results: dict) -> str:
    lines = ["| L | op | ms | TFLOP/s | peak GiB |", "|---|---|---|---|---|"]
    for row in results["kernels"]:
        if "error" in row:
            lines.append(f"| {row['L']:,} | {row['name']} | {row['error']} | | |")
        else:
            tf = f"{row['tflops']:.0f}" if "tflops" in row else ""
            lines.append(f"| {row['L']:,} | {row['name']} | {row['ms']:.2f} | {tf} | {row['peak_gib']:.2f} |")
    lines += ["", "| L | step | ms | tokens/s | total peak GiB (model, optimizer state, step) |",
              "|---|---|---|---|---|"]
    for row in results["e2e"]:
        if "L" not in row:
            continue
        if "error" in row:
            lines.append(f"| {row['L']:,} | {row['name']} | {row['error']} | | |")
        else:
            lines.append(f"| {row['L']:,} | {row['name']} | {row['ms']:.0f} | {row['tokens_per_sec']:,.0f} | "
                         f"{row['total_peak_gib']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[8192, 32768, 65536, 131072])
    ap.add_argument("--topk-lengths", type=int, nargs="*", default=[8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--e2e-lengths", type=int, nargs="*", default=[32768, 65536, 131072])
    ap.add_argument("--warmup-max", type=int, default=131072, help="longest warm-up step timed end to end")
    ap.add_argument("--twin-max", type=int, default=32768, help="longest length the PyTorch twins are timed at")
    ap.add_argument("--plain-max", type=int, default=16384, help="longest length plain PyTorch top-k is tried at")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--sections", nargs="*", default=["topk", "sparse_mla", "sdpa", "warmup_kl", "e2e", "bound"],
                    help="bound: the fastest a sparse step of the 1B model could be against its dense step "
                         "(at the e2e lengths; runs the dense step if e2e did not)")
    ap.add_argument("--e2e-stages", nargs="*", default=["base", "warmup", "sparse"])
    ap.add_argument("--e2e-cold-from", type=int, default=131072,
                    help="end-to-end steps this long are timed once, without a warm-up run")
    ap.add_argument("--e2e-index-heads", type=int, default=G,
                    help="end to end: indexer heads (DeepSeek's 64 by default; the 16-head 1B model's attention "
                         "costs less per token pair than a 64 x 128 indexer)")
    ap.add_argument("--e2e-index-dim", type=int, default=DI, help="end to end: indexer head dim")
    ap.add_argument("--recompute-topk", action="store_true",
                    help="end to end: recompute each layer's top-k in backward (stage.recompute_topk=true)")
    ap.add_argument("--sweep", nargs="*", choices=["warmup_kl", "sparse_mla", "sparse_mla_writes"],
                    help="only sweep these kernels' launch configurations, at the first of --lengths "
                         "(sparse_mla_writes: what the sparse MLA backward's atomics cost)")
    ap.add_argument("--sweep-heads", type=int, default=H, help="the sparse MLA sweep's head count (16: the 1B model)")
    ap.add_argument("--memory-marks", action="store_true",
                    help="end to end: print allocated memory after each step's forward and backward")
    ap.add_argument("--profile", action="store_true", help="print each op's top GPU kernels (torch.profiler)")
    ap.add_argument("--out", default="bench.json")
    args = ap.parse_args()
    PROFILE["on"], PROFILE["marks"] = args.profile, args.memory_marks
    if not torch.cuda.is_available():
        raise SystemExit("error: make bench needs a CUDA GPU (the kernels are Triton)")
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "kernels_backend": ops.backend(),
               "kernels": [], "e2e": []}

    def save():  # after every section, so that a cut run keeps what it measured
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    if args.sweep:
        results["sweep"] = sweep(args.lengths[0], args.iters, args.sweep, args.sweep_heads)
        results["compiled"] = compiled_stats()
        save()
        print(sweep_summary(results["sweep"]))
        for row in results["compiled"]:
            print(f"  [compiled] {row}")
        print(f"[bench] wrote {args.out}")
        return
    for L in args.topk_lengths if "topk" in args.sections else []:
        print(f"[topk] L={L}", flush=True)
        results["kernels"] += [{"L": L, **r} for r in bench_topk(L, args.iters, args.twin_max, args.plain_max)]
        save()
    sections = {"sparse_mla": lambda L: bench_sparse_mla(L, args.iters, args.twin_max),
                "sdpa": lambda L: bench_sdpa(L, args.iters),
                "warmup_kl": lambda L: bench_warmup_kl(L, args.iters, args.twin_max)}
    for L in args.lengths:
        for name, fn in sections.items():
            if name in args.sections:
                print(f"[{name}] L={L}", flush=True)
                results["kernels"] += [{"L": L, **r} for r in fn(L)]
                save()
    if args.e2e_lengths and "e2e" in args.sections:
        results["e2e"] = bench_e2e(args.e2e_lengths, max(1, args.iters // 2), args.warmup_max, args.e2e_stages,
                                   args.e2e_cold_from, args.recompute_topk, args.e2e_index_heads,
                                   args.e2e_index_dim)
        save()
    if args.e2e_lengths and "bound" in args.sections:
        print("[bound] the fastest possible sparse step of the 1B model against its dense step", flush=True)
        if not any(r.get("name", "").startswith("e2e dense step") for r in results["e2e"]):
            results["e2e"] += bench_e2e(args.e2e_lengths, max(1, args.iters // 2), args.warmup_max, ["base"],
                                        args.e2e_cold_from)
        results["bound"] = bench_bound(results["e2e"], args.iters)
        save()
    print(table(results))
    if results.get("bound"):
        print(bound_table(results["bound"]))
    print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()
