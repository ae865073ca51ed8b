"""Launch-configuration sweeps (`python -m bench --sweep ...`): how the kernels' default configurations were
chosen, re-runnable on another GPU. Each configuration is passed to the kernel as arguments; the defaults live
beside the kernels."""

from __future__ import annotations

import re

import torch

from bench.common import DV, H, guarded, sparse_mla_flops
from bench.kernels import bench_warmup_kl, sparse_mla_inputs

WARMUP_KL = [dict(BT=BT, BS=BS, NS=NS, num_warps=warps, num_stages=stages)
             for BT, BS, NS, warps in ((64, 64, 2, 4), (128, 64, 4, 8), (128, 64, 2, 8), (128, 128, 2, 8),
                                       (128, 32, 8, 4)) for stages in (2, 3)]
SPARSE_MLA_FWD = ((64, 64, 8, 2), (64, 32, 8, 2), (64, 64, 8, 1), (64, 64, 8, 3), (64, 32, 4, 2), (64, 128, 8, 2),
                  (64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 16, 2), (128, 32, 16, 1),
                  (128, 64, 16, 1))
SPARSE_MLA_BWD = ((32, 32, 8, 2), (32, 32, 4, 2), (32, 64, 8, 2), (16, 32, 4, 2), (64, 32, 8, 2), (64, 16, 8, 2),
                  (32, 16, 4, 2), (32, 32, 8, 1), (64, 32, 16, 2), (64, 16, 16, 2), (64, 32, 16, 1),
                  (128, 16, 16, 1))


def sweep(L: int, iters: int, kernels: list[str], heads: int = H) -> list[dict]:
    """`heads`: the sparse MLA's head count (DeepSeek-V3's 128, or the 1B model's 16: one program per query)."""
    rows = []
    if "warmup_kl" in kernels:
        for cfg in WARMUP_KL:
            rows += [{"L": L, "config": cfg, **r} for r in bench_warmup_kl(L, iters, 0, cfg, f"warmup_kl {cfg}")]
    if "sparse_mla" in kernels:
        rows += sweep_sparse_mla(L, iters, heads)
    if "tilelang_sparse_mla" in kernels:
        rows += sweep_tilelang_sparse_mla(L, iters, heads)
    return rows


def sweep_tilelang_sparse_mla(L: int, iters: int, heads: int) -> list[dict]:
    """TileLang's sparse MLA: the warp-specialised forward's key block and ring depth against the kernel whose
    warpgroups share every role, in the forward and the one-pass recomputation; the warp-specialised backward
    (dS, then dQ) against the one-kernel backward at two key blocks."""
    from train.ops import tilelang_sparse_mla as tk
    from train.ops import tilelang_sparse_mla_fwd as tk_fwd
    from train.ops.tilelang_sparse_mla_common import _config

    q, kv, idx, selected = sparse_mla_inputs(L, heads)
    fwd_flops, scale = sparse_mla_flops(heads, selected), 192 ** -0.5
    out, lse = tk.sparse_mla_forward(q, kv, idx, scale, DV)
    g = torch.randn_like(out)
    runs = {}
    for BK, NS in ((64, 2), (32, 4), (32, 2)):
        runs[f"fwd ws block_k={BK} stages={NS}"] = (
            lambda BK=BK, NS=NS: tk_fwd._ws(q, kv, idx, scale, DV, None, BK, NS), fwd_flops)
        runs[f"fwd+probs given lse ws block_k={BK} stages={NS}"] = (
            lambda BK=BK, NS=NS: tk_fwd._ws(q, kv, idx, scale, DV, lse, BK, NS), fwd_flops)
    runs["fwd plain"] = (lambda: tk_fwd._plain_forward(q, kv, idx, scale, DV), fwd_flops)
    runs["fwd+probs given lse plain"] = (lambda: tk_fwd._probs(q, kv, idx, lse, scale, DV, True,
                                                           _config("probs", heads)), fwd_flops)
    runs["bwd ws"] = (lambda: tk.sparse_mla_backward(q, kv, idx, out, lse, g, scale, DV), 2.5 * fwd_flops)
    for BK in (32, 16):
        runs[f"bwd plain block_k={BK}"] = (lambda BK=BK: tk.sparse_mla_backward(
            q, kv, idx, out, lse, g, scale, DV, block_k=BK, threads=256), 2.5 * fwd_flops)
    return [{"L": L, "config": name, **guarded(f"tilelang sparse_mla {name}", fn, iters, flops)}
            for name, (fn, flops) in runs.items()]


def sweep_sparse_mla(L: int, iters: int, heads: int) -> list[dict]:
    from train.ops import triton_sparse_mla as sm

    q, kv, idx, selected = sparse_mla_inputs(L, heads)
    fwd_flops, scale = sparse_mla_flops(heads, selected), 192 ** -0.5
    out, lse = sm.sparse_mla_forward(q, kv, idx, scale, DV)
    g = torch.randn_like(out)
    fwd, bwd = SPARSE_MLA_FWD, SPARSE_MLA_BWD
    if heads <= 16:  # one head block of 16: only the key block, warps and stages matter
        fwd = tuple((16, BK, warps, stages) for BK in (32, 64, 128) for warps in (2, 4, 8) for stages in (2, 3))
        bwd = tuple((16, BK, warps, stages) for BK in (16, 32, 64) for warps in (2, 4, 8) for stages in (1, 2))
    rows = []
    for BH, BK, warps, stages in fwd:
        cfg = dict(BH=BH, BK=BK, num_warps=warps, num_stages=stages)
        rows.append({"L": L, "config": cfg, **guarded(f"sparse_mla fwd {cfg}", lambda: sm.sparse_mla_forward(
            q, kv, idx, scale, DV, **cfg), iters, fwd_flops)})
        rows.append({"L": L, "config": cfg, **guarded(f"sparse_mla probs {cfg}", lambda: sm.sparse_mla_probs(
            q, kv, idx, lse, scale, DV, **cfg), iters)})
    for BH, BK, warps, stages in bwd:
        cfg = dict(BH=BH, BK=BK, num_warps=warps, num_stages=stages)
        rows.append({"L": L, "config": cfg, **guarded(f"sparse_mla bwd {cfg}", lambda: sm.sparse_mla_backward(
            q, kv, idx, out, lse, g, scale, DV, **cfg), iters, 2.5 * fwd_flops)})
    return rows


def compiled_stats() -> list[dict]:
    """Per compiled sparse MLA kernel: registers, spills, shared memory, and its tensor-core instructions in the
    PTX (Hopper's wgmma needs 64 rows per warpgroup in a tl.dot; smaller tiles fall back to mma.sync).
    Reads Triton's kernel cache (not a public API of Triton's): an empty list if that changes."""
    from train.ops import triton_sparse_mla as sm

    stats = []
    for fn in sm.KERNELS:
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
