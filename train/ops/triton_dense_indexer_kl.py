"""Warm-up indexer loss on the GPU (Triton); twin: `reference.dense_indexer_kl`.

KL(p_t || softmax(I_t)) over the full causal span, where p_t is the head-averaged dense attention, and
the indexer's recall (share of p_t inside its top-k). Nothing of size [H, L, L] or [L, L] is formed:

1. `_attn_lse_kernel`: per-head log-sum-exp of the main attention (flash-style, no values).
2. For a block of R query rows: indexer logits of those rows against all keys (`triton_topk.logit_keys`,
   an [R, L] buffer, R <= 2048: O(L x k)), their log-sum-exp, and the top-k threshold: the k-th largest
   64-bit key of `triton_topk.top_keys` (same tie rule as `topk_stable`).
3. `_kl_kernel`: recomputes p tile by tile from q, k and the log-sum-exps (a loop over heads), reads the
   logits, accumulates KL and recall per row; in backward it overwrites the buffer with dKL/dI =
   g_t (softmax(I_t) - p_t). Its grid spans row tiles x key chunks, so that even one row block fills
   the GPU; each program writes its own partial sums (no atomics: the result is deterministic).
4. Backward only: `_dq_kernel` (query side, dq and dw per indexer head) and `_dk_kernel` (key side)
   recompute relu(q_g . k) per tile and contract it with the buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from train.ops import common, reference, triton_topk

LOG2E = tl.constexpr(common.LOG2E)  # usable inside the kernels


def _split(d: int) -> tuple[int, int]:
    """d = d1 + d2 with d1 the largest power of two <= d and d2 a power of two or 0 (192 = 128 + 64)."""
    d1 = 1 << (d.bit_length() - 1)
    return d1, d - d1


@triton.jit
def _load_qk(ptr, rows, row_mask, D1: tl.constexpr, D2: tl.constexpr):
    a = tl.load(ptr + rows[:, None] + tl.arange(0, D1)[None, :], mask=row_mask[:, None], other=0.0)
    if D2 > 0:
        b = tl.load(ptr + rows[:, None] + D1 + tl.arange(0, D2)[None, :], mask=row_mask[:, None], other=0.0)
    else:
        b = a
    return a, b


@triton.jit
def _attn_lse_kernel(q_ptr, k_ptr, lse_ptr, scale, L, S, Q0, H, HG, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sl_b, sl_h,
                     D1: tl.constexpr, D2: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr):
    """Each head's log-sum-exp for query rows 0..L-1 at positions Q0.. over keys 0..S-1 (causal); query head h
    reads key head h // HG."""
    pid_t = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_t = pid_t * BT + tl.arange(0, BT)
    tmask = offs_t < L
    qa, qb = _load_qk(q_ptr + b * sq_b + h * sq_h, offs_t.to(tl.int64) * sq_t, tmask, D1, D2)
    m = tl.full([BT], float("-inf"), dtype=tl.float32)
    den = tl.zeros([BT], dtype=tl.float32)
    c = scale * LOG2E
    for s0 in range(0, Q0 + pid_t * BT + BT, BS):
        offs_s = s0 + tl.arange(0, BS)
        ka, kb = _load_qk(k_ptr + b * sk_b + (h // HG) * sk_h, offs_s.to(tl.int64) * sk_t, offs_s < S, D1, D2)
        s = tl.dot(qa, tl.trans(ka))
        if D2 > 0:
            s += tl.dot(qb, tl.trans(kb))
        s = tl.where(offs_s[None, :] <= Q0 + offs_t[:, None], s * c, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        den = den * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m = m_new
    tl.store(lse_ptr + b * sl_b + h * sl_h + offs_t, (m + tl.log2(den)) / LOG2E, mask=tmask)


@triton.jit
def _kl_kernel(qa_ptr, ka_ptr, lse_a_ptr, buf_ptr, sel_ptr, lse_s_ptr, kth_ptr, g_ptr, kl_ptr, rec_ptr,
               scale, t0, Q0, R, L, S, H, HG, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sl_b, sl_h, sbuf_b, sbuf_r, sr_b,
               sp_b, sp_r,
               D1: tl.constexpr, D2: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, NS: tl.constexpr,
               GRAD: tl.constexpr, SEL: tl.constexpr):
    """One program: BT rows x NS key tiles of BS keys. Forward writes the rows' KL and recall sums over its
    keys to kl_ptr / rec_ptr [B, R, key chunks] (summed outside: deterministic); backward overwrites buf.
    SEL: the top-k's sort keys come from sel (the FP8 indexer's, laid out like buf), not from buf's logits.
    t0 is the block's first query position; query rows sit at positions Q0 + row (L rows, S keys)."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_r = pid_t * BT + tl.arange(0, BT)  # rows of the block
    rmask = offs_r < R
    offs_t = t0 + offs_r  # query positions
    rows = offs_t - Q0  # their rows in q, lse and g
    s_start = pid_s * BS * NS
    if s_start > t0 + pid_t * BT + BT - 1:  # every key of the chunk is in the future of every row
        return
    lse_s = tl.load(lse_s_ptr + b * sr_b + offs_r, mask=rmask, other=0.0)
    if GRAD:
        g = tl.load(g_ptr + b * L + rows, mask=rmask, other=0.0)
    else:
        kth = tl.load(kth_ptr + b * sr_b + offs_r, mask=rmask, other=0)
    kl = tl.zeros([BT], dtype=tl.float32)
    rec = tl.zeros([BT], dtype=tl.float32)
    c = scale * LOG2E
    q_rows = rows.to(tl.int64) * sq_t
    for j in range(NS):
        offs_s = s_start + j * BS + tl.arange(0, BS)
        visible = (offs_s[None, :] <= offs_t[:, None]) & rmask[:, None]
        p = tl.zeros([BT, BS], dtype=tl.float32)
        k_rows = offs_s.to(tl.int64) * sk_t
        for h in range(H):
            qa, qb = _load_qk(qa_ptr + b * sq_b + h * sq_h, q_rows, rmask, D1, D2)
            ka, kb = _load_qk(ka_ptr + b * sk_b + (h // HG) * sk_h, k_rows, offs_s < S, D1, D2)
            s = tl.dot(qa, tl.trans(ka))
            if D2 > 0:
                s += tl.dot(qb, tl.trans(kb))
            lse_h = tl.load(lse_a_ptr + b * sl_b + h * sl_h + rows, mask=rmask, other=0.0)
            p += tl.exp2(s * c - lse_h[:, None] * LOG2E)
        p = tl.where(visible, p / H, 0.0)
        buf = buf_ptr + b * sbuf_b + offs_r[:, None].to(tl.int64) * sbuf_r + offs_s[None, :]
        logit = tl.load(buf, mask=visible, other=0.0)
        logq = logit - lse_s[:, None]
        if GRAD:
            tl.store(buf, g[:, None] * (tl.exp(logq) - p), mask=visible)
        else:
            kl += tl.sum(tl.where(visible & (p > 0), p * (tl.log(tl.where(p > 0, p, 1.0)) - logq), 0.0), 1)
            if SEL:
                sel = sel_ptr + b * sbuf_b + offs_r[:, None].to(tl.int64) * sbuf_r + offs_s[None, :]
                ordered = tl.load(sel, mask=visible, other=0).to(tl.int64)
            else:
                bits = logit.to(tl.int32, bitcast=True)
                ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
            keys = ordered * 4294967296 + (4294967295 - offs_s[None, :].to(tl.int64))
            rec += tl.sum(tl.where(visible & (keys >= kth[:, None]), p, 0.0), 1)
    if not GRAD:
        tl.store(kl_ptr + b * sp_b + offs_r * sp_r + pid_s, kl, mask=rmask)
        tl.store(rec_ptr + b * sp_b + offs_r * sp_r + pid_s, rec, mask=rmask)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, w_ptr, buf_ptr, dq_ptr, dw_ptr, t0, Q0, R, S,
               sq_b, sq_t, sq_g, sk_b, sk_s, sw_b, sw_t, sbuf_b, sbuf_r,
               D: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr):
    pid_t = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_r = pid_t * BT + tl.arange(0, BT)
    rmask = offs_r < R
    offs_t = (t0 + offs_r).to(tl.int64)  # positions
    rows = offs_t - Q0
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sq_b + rows[:, None] * sq_t + g * sq_g + offs_d[None, :], mask=rmask[:, None], other=0.0)
    w = tl.load(w_ptr + b * sw_b + rows * sw_t + g, mask=rmask, other=0.0).to(tl.float32)
    dq = tl.zeros([BT, D], dtype=tl.float32)
    dw = tl.zeros([BT], dtype=tl.float32)
    for s0 in range(0, t0 + pid_t * BT + BT, BS):
        offs_s = s0 + tl.arange(0, BS)
        k = tl.load(k_ptr + b * sk_b + offs_s[:, None].to(tl.int64) * sk_s + offs_d[None, :],
                    mask=offs_s[:, None] < S, other=0.0)
        raw = tl.dot(q, tl.trans(k))
        visible = (offs_s[None, :] <= offs_t[:, None]) & rmask[:, None]
        dl = tl.load(buf_ptr + b * sbuf_b + offs_r[:, None].to(tl.int64) * sbuf_r + offs_s[None, :], mask=visible,
                     other=0.0)
        dw += tl.sum(dl * tl.maximum(raw, 0.0), 1)
        ds = tl.where(raw > 0, dl * w[:, None], 0.0).to(k.dtype)
        dq += tl.dot(ds, k)
    tl.store(dq_ptr + b * sq_b + rows[:, None] * sq_t + g * sq_g + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=rmask[:, None])
    tl.store(dw_ptr + b * sw_b + rows * sw_t + g, dw.to(dw_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _dk_kernel(q_ptr, k_ptr, w_ptr, buf_ptr, dk_ptr, t0, Q0, R, G,
               sq_b, sq_t, sq_g, sk_b, sk_s, sw_b, sw_t, sbuf_b, sbuf_r, sdk_b, sdk_s,
               D: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr):
    """dk of keys s0..s0+BS from the block's queries at positions t0..t0+R, rows t0-Q0.. (added to dk: blocks run
    one after another)."""
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_s = pid_s * BS + tl.arange(0, BS)
    smask = offs_s < t0 + R
    offs_d = tl.arange(0, D)
    k = tl.load(k_ptr + b * sk_b + offs_s[:, None].to(tl.int64) * sk_s + offs_d[None, :], mask=smask[:, None], other=0.0)
    dk = tl.zeros([BS, D], dtype=tl.float32)
    r_start = tl.maximum(pid_s * BS - t0, 0) // BT * BT  # the first row tile that sees these keys
    for r0 in range(r_start, R, BT):
        offs_r = r0 + tl.arange(0, BT)
        rmask = offs_r < R
        offs_t = (t0 + offs_r).to(tl.int64)
        rows = offs_t - Q0
        visible = (offs_s[None, :] <= offs_t[:, None]) & rmask[:, None] & smask[None, :]
        dl = tl.load(buf_ptr + b * sbuf_b + offs_r[:, None].to(tl.int64) * sbuf_r + offs_s[None, :], mask=visible,
                     other=0.0)
        for g in range(G):
            q = tl.load(q_ptr + b * sq_b + rows[:, None] * sq_t + g * sq_g + offs_d[None, :], mask=rmask[:, None],
                        other=0.0)
            w = tl.load(w_ptr + b * sw_b + rows * sw_t + g, mask=rmask, other=0.0).to(tl.float32)
            raw = tl.dot(q, tl.trans(k))
            ds = tl.where(raw > 0, dl * w[:, None], 0.0).to(q.dtype)
            dk += tl.dot(tl.trans(ds), q)
    ptrs = dk_ptr + b * sdk_b + offs_s[:, None].to(tl.int64) * sdk_s + offs_d[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=smask[:, None], other=0.0) + dk, mask=smask[:, None])


def _attn_lse(qa, ka, scale, q0=0):
    B, L, H, D = qa.shape
    D1, D2 = _split(D)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=qa.device)
    cfg = dict(CONFIGS["lse"])
    BT, BS = cfg.pop("BT"), cfg.pop("BS")
    _attn_lse_kernel[(triton.cdiv(L, BT), B * H)](qa, ka, lse, scale, L, ka.shape[1], q0, H, H // ka.shape[2],
                                                  qa.stride(0),
                                                  qa.stride(1), qa.stride(2), ka.stride(0), ka.stride(1),
                                                  ka.stride(2), lse.stride(0), lse.stride(1), D1=D1, D2=D2, BT=BT,
                                                  BS=BS, **cfg)
    return lse


def _indexer_block(qi, ki, wi, t0, t1, topk, need_kth=True, q0=0, fp8=None):
    """(logits [B, R, q0 + t1] fp32, their log-sum-exp [B, R], the k-th largest 64-bit key of `top_keys` [B, R] or
    None, the sort keys the top-k was taken from when they are not the logits' or None) of rows t0..t1-1, at
    positions q0 + t0... `fp8`: the FP8 indexer's keys and their scales (`reference.fp8_indexer_keys`), whose
    logits then give the top-k."""
    keys = triton_topk.logit_keys(qi[:, t0:t1], ki[:, : q0 + t1], wi[:, t0:t1], q0 + t0)
    kth = sel = None
    if need_kth:
        if fp8 is not None:
            q8, w8 = reference.fp8_indexer_queries(qi[:, t0:t1], wi[:, t0:t1])
            sel = triton_topk.logit_keys(q8, fp8[0][:, : q0 + t1], w8, q0 + t0, fp8[1][:, : q0 + t1])
        kth = triton_topk.top_keys(keys if sel is None else sel, min(topk, q0 + t1)).min(dim=-1).values.contiguous()
    logits = triton_topk.decode_keys(keys)
    del keys
    return logits, torch.logsumexp(logits, dim=-1).contiguous(), kth, sel


# Launch configurations, Triton's own names: the KL kernel's is the fastest of `python -m bench --sweep warmup_kl` on
# the H200 (BT rows x NS tiles of BS keys a program); the others: row and key tiles of the attention's log-sum-exp
# and of the backward's query and key sides.
CONFIGS = {"kl": dict(BT=128, BS=64, NS=4, num_warps=8, num_stages=3),
           "lse": dict(BT=64, BS=64, num_warps=4, num_stages=2),
           "grad": dict(BT=64, BS=64, num_warps=4, num_stages=2)}


def _kl_launch(qa, ka, lse_a, buf, lse_s, kth, g, scale, t0, grad, config, q0=0, sel=None):
    """Forward (grad False): (kl, recall) sums of the queries at positions t0..t0+R-1 (rows t0-q0..) [B, R];
    backward: buf <- dKL/dI, None."""
    B, L, H, D = qa.shape
    D1, D2 = _split(D)
    R, S = buf.shape[1], buf.shape[2]
    cfg = dict(config)
    BT, BS, NS = cfg.pop("BT"), cfg.pop("BS"), cfg.pop("NS")
    chunks = triton.cdiv(S, BS * NS)
    kl = rec = None
    if not grad:
        kl = torch.zeros(B, R, chunks, dtype=torch.float32, device=qa.device)
        rec = torch.zeros_like(kl)
    _kl_kernel[(triton.cdiv(R, BT), chunks, B)](
        qa, ka, lse_a, buf, buf if sel is None else sel, lse_s, kth, g,
        kl if kl is not None else g, rec if rec is not None else g, scale, t0,
        q0, R, L, ka.shape[1], H, H // ka.shape[2], qa.stride(0), qa.stride(1), qa.stride(2), ka.stride(0), ka.stride(1), ka.stride(2),
        lse_a.stride(0), lse_a.stride(1), buf.stride(0), buf.stride(1), lse_s.stride(0),
        kl.stride(0) if kl is not None else 0, kl.stride(1) if kl is not None else 0,
        D1=D1, D2=D2, BT=BT, BS=BS, NS=NS, GRAD=grad, SEL=sel is not None, **cfg)
    return (kl.sum(-1), rec.sum(-1)) if not grad else None


class DenseIndexerKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qi, ki, wi, qa, ka, scale, topk, rows, config, q0, fp8):
        qi, ki, wi, qa, ka = (t.contiguous() for t in (qi, ki, wi, qa, ka))
        ctx.k_dtype = ki.dtype
        ki = ki.to(qi.dtype)
        B, L = qi.shape[:2]
        lse_a = _attn_lse(qa, ka, scale, q0)
        kl = torch.empty(B, L, dtype=torch.float32, device=qi.device)
        rec = torch.empty_like(kl)
        rows = rows or triton_topk.query_rows(ki.shape[1], topk)
        keys8 = reference.fp8_indexer_keys(ki) if fp8 else None
        for t0 in range(0, L, rows):
            t1 = min(L, t0 + rows)
            buf, lse_s, kth, sel = _indexer_block(qi, ki, wi, t0, t1, topk, q0=q0, fp8=keys8)
            kl[:, t0:t1], rec[:, t0:t1] = _kl_launch(qa, ka, lse_a, buf, lse_s, kth, kl, scale, q0 + t0, grad=False,
                                                    config=config, q0=q0, sel=sel)
            del sel
        ctx.save_for_backward(qi, ki, wi, qa, ka, lse_a)
        ctx.scale, ctx.topk, ctx.rows, ctx.config, ctx.q0 = scale, topk, rows, config, q0
        ctx.mark_non_differentiable(rec)
        return kl, rec

    @staticmethod
    def backward(ctx, dkl, _drec):
        qi, ki, wi, qa, ka, lse_a = ctx.saved_tensors
        B, L, G, D = qi.shape
        dkl = dkl.float().contiguous()
        dq, dw = torch.zeros_like(qi), torch.zeros_like(wi)
        dk = torch.zeros(ki.shape, dtype=torch.float32, device=ki.device)
        rows, q0, S = ctx.rows, ctx.q0, ki.shape[1]
        cfg = dict(CONFIGS["grad"])
        BT, BS = cfg.pop("BT"), cfg.pop("BS")
        for t0 in range(0, L, rows):
            t1 = min(L, t0 + rows)
            R = t1 - t0
            buf, lse_s, _, _ = _indexer_block(qi, ki, wi, t0, t1, ctx.topk, need_kth=False, q0=q0)
            _kl_launch(qa, ka, lse_a, buf, lse_s, lse_s, dkl, ctx.scale, q0 + t0, grad=True, config=ctx.config, q0=q0)
            _dq_kernel[(triton.cdiv(R, BT), G, B)](qi, ki, wi, buf, dq, dw, q0 + t0, q0, R, S, qi.stride(0),
                                                   qi.stride(1), qi.stride(2), ki.stride(0), ki.stride(1),
                                                   wi.stride(0), wi.stride(1), buf.stride(0), buf.stride(1), D=D,
                                                   BT=BT, BS=BS, **cfg)
            _dk_kernel[(triton.cdiv(q0 + t1, BS), B)](qi, ki, wi, buf, dk, q0 + t0, q0, R, G, qi.stride(0),
                                                      qi.stride(1), qi.stride(2), ki.stride(0), ki.stride(1),
                                                      wi.stride(0), wi.stride(1), buf.stride(0), buf.stride(1),
                                                      dk.stride(0), dk.stride(1), D=D, BT=BT, BS=BS, **cfg)
        return dq, dk.to(ctx.k_dtype), dw, None, None, None, None, None, None, None, None


def dense_indexer_kl(qi_BLGD, ki_BSD, wi_BLG, qa_BLHD, ka_BSHD, scale: float, topk: int, rows: int | None = None,
                     config: dict | None = None, q_offset: int = 0, fp8: bool = False):
    """Same contract as `reference.dense_indexer_kl`: (kl [B, L] fp32, recall [B, L] fp32, no gradient).

    `rows`: query rows per indexer-logit block (default max(256, min(L, topk))); memory 8 bytes x rows x L.
    `config`: the KL kernel's launch configuration (the keys of CONFIGS["kl"]; default it). Queries sit at
    positions q_offset + t among the S keys (a context-parallel piece). `fp8`: the recall's top-k is the FP8
    indexer's (memory: 4 more bytes x rows x L)."""
    return DenseIndexerKL.apply(qi_BLGD, ki_BSD, wi_BLG, qa_BLHD.detach(), ka_BSHD.detach(), scale, topk, rows,
                                config or CONFIGS["kl"], q_offset, fp8)
