"""Indexer logits and top-k on the GPU (Triton); twin: `reference.indexer_topk`.

One kernel scores a block of R queries against every key, fusing the G indexer heads (relu, weights,
head sum) and the causal mask, and writes each score as an int32 *sort key*: the fp32 logit's bits mapped
to a monotonic integer (-inf, for invisible keys, is the lowest). `torch.topk` over these 32-bit keys gives
each row's k-th largest key (the threshold; ties make the *set* of positions ambiguous, the value is not);
a second kernel then takes, in position order, every key above the threshold and the lowest-positioned
ties at it until k are taken, as 64-bit keys (sort key in the high word, `2**32 - 1 - position` in the
low). Sorting those gives descending logit order with ties to the lower position, exactly like
`topk_stable`; -inf (invisible) scores sort last and come back as -1. Offsets are int64 throughout (128K+
columns, any batch). Memory: one [R, L] int32 buffer with R = max(topk, 256) rows, O(L x k).

The FP8 indexer (`fp8=True`; twin: `reference.indexer_topk_fp8`) scores e4m3 queries and keys on the tensor
cores: each head's dot product in fp32, the head's scale folded into its weight, the key's scale applied to the
head sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from train.ops import reference

NEG_INF_KEY = -(2**31) + 0x7FFFFF  # -inf's sort key: 0xFF800000 ^ 0x7FFFFFFF as int32


@triton.jit
def _logit_keys_kernel(q_ptr, k_ptr, w_ptr, ks_ptr, out_ptr, t0, T, S,
                       sq_b, sq_t, sq_g, sk_b, sk_s, sw_b, sw_t, sks_b, so_b, so_t,
                       G: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, SCALED: tl.constexpr,
                       RAW: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_t = (pid_t * BT + tl.arange(0, BT)).to(tl.int64)  # rows of this query block
    offs_s = (pid_s * BS + tl.arange(0, BS)).to(tl.int64)
    offs_d = tl.arange(0, D)
    acc = tl.zeros([BT, BS], dtype=tl.float32)
    if pid_s * BS <= t0 + pid_t * BT + BT - 1:  # tiles wholly above the diagonal stay -inf
        k = tl.load(k_ptr + b * sk_b + offs_s[:, None] * sk_s + offs_d[None, :], mask=offs_s[:, None] < S, other=0.0)
        for g in range(G):
            q = tl.load(q_ptr + b * sq_b + offs_t[:, None] * sq_t + g * sq_g + offs_d[None, :],
                        mask=offs_t[:, None] < T, other=0.0)
            w = tl.load(w_ptr + b * sw_b + offs_t * sw_t + g, mask=offs_t < T, other=0.0).to(tl.float32)
            acc += tl.maximum(tl.dot(q, tl.trans(k)), 0.0) * w[:, None]
        if SCALED:  # the keys' scales (positive: relu and the head sum commute with them)
            acc *= tl.load(ks_ptr + b * sks_b + offs_s, mask=offs_s < S, other=1.0)[None, :]
    visible = offs_s[None, :] <= (t0 + offs_t)[:, None]
    acc = tl.where(visible, acc, float("-inf"))
    if RAW:  # the fp32 logits themselves
        out = acc
    else:
        bits = acc.to(tl.int32, bitcast=True)
        out = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    tl.store(out_ptr + b * so_b + offs_t[:, None] * so_t + offs_s[None, :], out,
             mask=(offs_t[:, None] < T) & (offs_s[None, :] < S))


@triton.jit
def _top_keys_kernel(keys_ptr, thr_ptr, out_ptr, S, K, sk_b, sk_r, st_b, so_b, so_r, BS: tl.constexpr):
    """Row r: every sort key above thr[r], then ties at it in position order until K are taken, as 64-bit
    keys in position order (the rest of the row's K slots keep what the caller put there)."""
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    row = keys_ptr + b * sk_b + r * sk_r
    thr = tl.load(thr_ptr + b * st_b + r)
    n_gt = tl.full([], 0, tl.int32)
    for s0 in range(0, S, BS):  # first pass: how many are above the threshold
        offs = s0 + tl.arange(0, BS)
        k = tl.load(row + offs, mask=offs < S, other=-(2**31))  # below every key, -inf's included
        n_gt += tl.sum((k > thr).to(tl.int32), 0)
    need = K - n_gt  # ties to take, lowest positions first
    n_out = tl.full([], 0, tl.int32)
    n_eq = tl.full([], 0, tl.int32)
    out = out_ptr + b * so_b + r * so_r
    for s0 in range(0, S, BS):
        offs = s0 + tl.arange(0, BS)
        k = tl.load(row + offs, mask=offs < S, other=-(2**31))
        eq = (k == thr).to(tl.int32)
        take = ((k > thr) | ((eq != 0) & (n_eq + tl.cumsum(eq, 0) <= need))).to(tl.int32)
        slot = n_out + tl.cumsum(take, 0) - 1
        wide = k.to(tl.int64) * 4294967296 + (4294967295 - offs.to(tl.int64))
        tl.store(out + slot, wide, mask=take != 0)
        n_out += tl.sum(take, 0)
        n_eq += tl.sum(eq, 0)


CONFIGS = {"bf16": dict(BT=64, BS=128, num_warps=4, num_stages=2),
           "fp8": dict(BT=64, BS=128, num_warps=4, num_stages=2)}


def logit_keys(q_BTGD: torch.Tensor, k_BSD: torch.Tensor, w_BTG: torch.Tensor, t0: int,
               k_scale_BS: torch.Tensor | None = None, config: dict | None = None, raw: bool = False) -> torch.Tensor:
    """[B, T, S] int32 sort keys of the indexer logits of queries t0..t0+T-1 over keys 0..S-1 (with `raw`, the fp32
    logits, -inf where a key is not visible); with `k_scale_BS`, of the FP8 indexer (e4m3 q and k, the queries'
    scales in w).

    Launch configurations (CONFIGS): bf16's the fastest of a sweep on the H200 (G 64, D 128, 16K keys); FP8 takes
    the same (not swept yet)."""
    B, T, G, D = q_BTGD.shape
    S = k_BSD.shape[1]
    q, k, w = q_BTGD.contiguous(), k_BSD.contiguous(), w_BTG.float().contiguous()
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    ks = k_scale_BS.float().contiguous() if k_scale_BS is not None else w  # w: a placeholder the kernel never reads
    c = config or CONFIGS["fp8" if k_scale_BS is not None else "bf16"]
    out = torch.empty(B, T, S, dtype=torch.float32 if raw else torch.int32, device=q.device)
    grid = (triton.cdiv(S, c["BS"]), triton.cdiv(T, c["BT"]), B)
    _logit_keys_kernel[grid](q, k, w, ks, out, t0, T, S, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
                             k.stride(1), w.stride(0), w.stride(1), ks.stride(0), out.stride(0), out.stride(1), G=G,
                             D=D, SCALED=k_scale_BS is not None, RAW=raw, **c)
    return out


def decode_keys(keys: torch.Tensor) -> torch.Tensor:
    """The fp32 logits of int32 sort keys."""
    return torch.where(keys >= 0, keys, keys ^ 0x7FFFFFFF).view(torch.float32)


def top_keys(keys_BTS: torch.Tensor, k: int, BS: int = 1024) -> torch.Tensor:
    """[B, T, k] int64 keys of each row's top k (descending logit, ties to the lower position), in position
    order: sort key << 32 | (2**32 - 1 - position). Rows with fewer than k keys are padded with -inf's key
    (high word NEG_INF_KEY). The largest 64-bit key is the best; `>= min` tests membership."""
    B, T, S = keys_BTS.shape
    keys = keys_BTS.contiguous()
    if S > k:
        thr = torch.topk(keys, k, dim=-1, sorted=False).values.min(dim=-1).values.contiguous()
    else:  # every key is in: the threshold is the lowest possible one
        thr = torch.full((B, T), NEG_INF_KEY, dtype=torch.int32, device=keys.device)
    out = torch.full((B, T, k), NEG_INF_KEY << 32, dtype=torch.int64, device=keys.device)
    _top_keys_kernel[(T, B)](keys, thr, out, S, k, keys.stride(0), keys.stride(1), thr.stride(0), out.stride(0),
                             out.stride(1), BS=BS)
    return out


def query_rows(L: int, topk: int) -> int:
    """Query rows per block of logits: max(k, 256), so the [rows, L] buffer is O(L x k)."""
    return max(min(topk, L), 256)


def _positions(top: torch.Tensor) -> torch.Tensor:
    """Positions of 64-bit top keys (`top_keys`' form), -1 for -inf's."""
    pos = 4294967295 - (top & 0xFFFFFFFF)
    return pos.masked_fill((top >> 32) == NEG_INF_KEY, -1)


def order(logits_BTS: torch.Tensor, pos_BTK: torch.Tensor) -> torch.Tensor:
    """A selection given in any order (positions, -1 for none) in the twin's order: descending logit, ties to the
    lower position, -1 last; int64 [B, T, K]. logits_BTS: the fp32 logits the positions index."""
    valid = pos_BTK >= 0
    pos = pos_BTK.long().clamp(min=0)
    bits = logits_BTS.gather(-1, pos).view(torch.int32)
    keys = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long()
    wide = ((keys << 32) | (4294967295 - pos)).masked_fill(~valid, NEG_INF_KEY << 32)
    return _positions(torch.sort(wide, dim=-1, descending=True).values)


@torch.no_grad()
def indexer_topk(q_BLGD: torch.Tensor, k_BSD: torch.Tensor, w_BLG: torch.Tensor, topk: int,
                 q_offset: int = 0, fp8: bool = False, select=None) -> torch.Tensor:
    """Same contract as `reference.indexer_topk` (`reference.indexer_topk_fp8` with `fp8`): [B, L, min(topk, S)]
    int64, descending, -1 where invalid; query t sits at position q_offset + t among the S keys. `select`
    (`cudnn_topk.select`'s contract: raw logits, k, the block's first position -> positions in any order) takes
    each block's selection in place of `top_keys`."""
    B, L, G, D = q_BLGD.shape
    K = min(topk, k_BSD.shape[1])
    rows = query_rows(k_BSD.shape[1], topk)
    out = torch.empty(B, L, K, dtype=torch.long, device=q_BLGD.device)
    k_scale = None
    if fp8:
        k_BSD, k_scale = reference.fp8_indexer_keys(k_BSD)
    for t0 in range(0, L, rows):
        t1 = min(L, t0 + rows)
        q_BTGD, w_BTG = q_BLGD[:, t0:t1], w_BLG[:, t0:t1]
        if fp8:
            q_BTGD, w_BTG = reference.fp8_indexer_queries(q_BTGD, w_BTG)
        scales = k_scale[:, : q_offset + t1] if fp8 else None
        logits = logit_keys(q_BTGD, k_BSD[:, : q_offset + t1], w_BTG, q_offset + t0, scales, raw=select is not None)
        if select is None:
            out[:, t0:t1] = _positions(torch.sort(top_keys(logits, K), dim=-1, descending=True).values)
        else:
            out[:, t0:t1] = order(logits, select(logits, K, q_offset + t0))
    return out
