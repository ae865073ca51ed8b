"""The indexer top-k's selection step, in parts, on the same sort keys (GPU; `python -m bench --sections
topk_select`): the logits of one query block, each row's threshold by `torch.topk` (what `triton_topk.top_keys`
takes) and by a radix select over the visible keys written here (an experiment: slower on the H100), the
position-ordered take, cuDNN's Hopper radix top-k (`indexer_top_k_wrapper`, where the frontend is installed: fp32
logits, a visible length per row, ties to the lower position), and the sort into logit order that follows."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from train.ops import cudnn_topk, triton_topk

NEG_INF_KEY = tl.constexpr(triton_topk.NEG_INF_KEY)  # usable inside the kernel


@triton.jit
def _radix_threshold_kernel(keys_ptr, thr_ptr, t0, S, K, sk_b, sk_r, st_b, BS: tl.constexpr):
    """thr[r] = the K-th largest int32 sort key of row r's visible prefix (keys 0..t0 + r), or -inf's key where the
    prefix holds at most K keys (the take gives the same set either way); found a byte at a time, most significant
    first, from histograms of the keys whose higher bytes match it so far."""
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    row = keys_ptr + b * sk_b + r * sk_r
    n = tl.minimum(S, t0 + r + 1)
    bins = tl.arange(0, 256)
    prefix = tl.full([], 0, tl.uint32)
    need = tl.full([], 0, tl.int32) + K
    for p in tl.static_range(4):
        shift = 24 - 8 * p
        hist = tl.zeros([256], dtype=tl.int32)
        other = tl.full([], 0, tl.int32)
        for s0 in range(0, n, BS):
            offs = s0 + tl.arange(0, BS)
            inside = offs < n
            u = tl.load(row + offs, mask=inside, other=0).to(tl.uint32, bitcast=True) ^ 0x80000000
            match = inside
            if p > 0:
                match = match & ((u >> (shift + 8)) == prefix)
            digit = tl.where(match, (u >> shift) & 0xFF, 0).to(tl.int32)
            hist += tl.histogram(digit, 256)
            other += tl.sum((~match).to(tl.int32), 0)  # counted in bin 0 above: taken out below
        hist -= tl.where(bins == 0, other, 0)
        at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # keys of this digit or a higher one
        d = tl.sum((at_or_above >= need).to(tl.int32), 0) - 1
        need -= tl.sum(tl.where(bins > d, hist, 0), 0)
        prefix = (prefix << 8) | d.to(tl.uint32)
    thr = (prefix ^ 0x80000000).to(tl.int32, bitcast=True)
    tl.store(thr_ptr + b * st_b + r, tl.where(n > K, thr, NEG_INF_KEY))


def radix_threshold(keys_BTS: torch.Tensor, k: int, t0: int, BS: int = 1024) -> torch.Tensor:
    """[B, T] int32: each row's k-th largest sort key over its visible keys 0..t0 + r (-inf's key where a row holds
    at most k): a radix select in four 8-bit histogram passes, tried in place of `torch.topk`'s threshold."""
    B, T, S = keys_BTS.shape
    keys = keys_BTS.contiguous()
    thr = torch.empty(B, T, dtype=torch.int32, device=keys.device)
    _radix_threshold_kernel[(T, B)](keys, thr, t0, S, k, keys.stride(0), keys.stride(1), thr.stride(0), BS=BS)
    return thr


def topk_threshold(keys_BTS: torch.Tensor, k: int) -> torch.Tensor:
    """`torch.topk` over the whole row, as `triton_topk.top_keys` takes it."""
    return torch.topk(keys_BTS, k, dim=-1, sorted=False).values.min(dim=-1).values


def cudnn_topk(keys_BTS: torch.Tensor, k: int, t0: int) -> torch.Tensor:
    """cuDNN's radix top-k of each row's visible prefix (`cudnn_topk.select`, what `auto` runs): [B, T, k] int32
    positions in no order, -1 past a short row, from the fp32 logits the sort keys encode."""
    return cudnn_topk.select(triton_topk.decode_keys(keys_BTS), k, t0)


def bench_topk_select(L: int, iters: int) -> list[dict]:
    """At the last (longest) query block of an L-token sequence, DeepSeek's indexer shape: the logits kernel, each
    threshold, the position-ordered take and the sort, each alone; the thresholds compared."""
    from bench.common import DI, TOPK, G, guarded

    dev = "cuda"
    rows = triton_topk.query_rows(L, TOPK)
    t0 = L - rows
    q = torch.randn(1, rows, G, DI, device=dev, dtype=torch.bfloat16)
    kk = torch.randn(1, L, DI, device=dev, dtype=torch.bfloat16)
    w = torch.randn(1, rows, G, device=dev) * (G * DI) ** -0.5
    keys = triton_topk.logit_keys(q, kk, w, t0)
    thr = topk_threshold(keys, TOPK)
    same = bool(torch.equal(radix_threshold(keys, TOPK, t0), thr))
    top = triton_topk.top_keys(keys, TOPK)
    out = [guarded(f"select L={L}: logits (one block)", lambda: triton_topk.logit_keys(q, kk, w, t0), iters),
           guarded(f"select L={L}: threshold, torch.topk", lambda: topk_threshold(keys, TOPK), iters),
           guarded(f"select L={L}: threshold, radix", lambda: radix_threshold(keys, TOPK, t0), iters),
           guarded(f"select L={L}: top_keys (threshold + take)", lambda: triton_topk.top_keys(keys, TOPK),
                   iters),
           guarded(f"select L={L}: sort into logit order", lambda: torch.sort(top, dim=-1, descending=True), iters)]
    out[2]["same_threshold_as_torch_topk"] = same
    try:
        want = triton_topk._positions(top).sort(-1).values
        got = cudnn_topk(keys, TOPK, t0).long().sort(-1).values
        out.append(guarded(f"select L={L}: cuDNN radix top-k (positions)", lambda: cudnn_topk(keys, TOPK, t0),
                           iters))
        out[-1]["same_set_as_ours"] = bool(torch.equal(got, want))
    except ImportError as e:
        out.append({"name": f"select L={L}: cuDNN radix top-k", "error": f"not installed ({e})"})
    for r in out:
        r["blocks_in_sequence"] = triton.cdiv(L, rows)
    return out
