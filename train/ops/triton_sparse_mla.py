"""Sparse MLA in MQA (absorbed) form on the GPU (Triton); twin: `reference.sparse_mla`.

One program serves one query token and a block of BH heads: it gathers each selected latent row
[latent (DV) | rope key (DR)] once per key block and uses it for all BH heads, with an online softmax in
fp32. Forward writes the output and the per-head log-sum-exp; a second kernel turns the log-sum-exp into
the head-averaged probabilities over the selected set (the sparse indexer loss's target). Given the
log-sum-exp of an earlier forward (the checkpoint recomputation), one kernel gives both in one pass. Backward
recomputes the scores from the log-sum-exp and scatters the latent-row gradient with fp32 atomics.
Invalid selections (-1) are masked; a query with none gets a zero output.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from train.ops import common
from train.ops.autograd import sparse_mla_function

LOG2E = tl.constexpr(common.LOG2E)  # usable inside the kernels


def _block_h(H: int, limit: int) -> int:
    """Heads per program: at most `limit`, at least 16 (tl.dot's smallest M; extra heads are masked)."""
    return max(16, min(limit, triton.next_power_of_2(H)))


@triton.jit
def _program(L, H, BH: tl.constexpr):
    """This program's token row pid_t = b * L + t (int64), its batch index, its heads and their mask. The head
    blocks of a token are neighbouring programs, so that they run side by side and share its gathered rows (and,
    in backward, the rows' gradient lines) in L2. One grid axis: the second is limited to 65,535."""
    blocks = tl.cdiv(H, BH)
    pid = tl.program_id(0).to(tl.int64)
    pid_t = pid // blocks
    offs_h = (pid % blocks).to(tl.int32) * BH + tl.arange(0, BH)
    return pid_t, pid_t // L, offs_h, offs_h < H


@triton.jit
def _load_q(q_ptr, pid_t, offs_h, hmask, sq_t, sq_h, DV: tl.constexpr, DR: tl.constexpr):
    """The [BH, DV] latent and [BH, DR] rope parts of the queries of token pid_t, heads offs_h."""
    base = q_ptr + pid_t * sq_t + offs_h[:, None] * sq_h
    qn = tl.load(base + tl.arange(0, DV)[None, :], mask=hmask[:, None], other=0.0)
    qr = tl.load(base + DV + tl.arange(0, DR)[None, :], mask=hmask[:, None], other=0.0)
    return qn, qr


@triton.jit
def _gather(kv_ptr, idx_ptr, pid_t, b, k0, K, si_t, skv_b, skv_s,
            DV: tl.constexpr, DR: tl.constexpr, BK: tl.constexpr):
    """Selections k0..k0+BK of token pid_t: (valid, row index with 0 for invalid, latent rows, rope rows)."""
    offs_k = k0 + tl.arange(0, BK)
    ids = tl.load(idx_ptr + pid_t * si_t + offs_k, mask=offs_k < K, other=-1).to(tl.int64)
    valid = ids >= 0
    safe = tl.where(valid, ids, 0)
    row = kv_ptr + b * skv_b + safe * skv_s
    kvn = tl.load(row[:, None] + tl.arange(0, DV)[None, :], mask=valid[:, None], other=0.0)
    kvr = tl.load(row[:, None] + DV + tl.arange(0, DR)[None, :], mask=valid[:, None], other=0.0)
    return valid, safe, kvn, kvr


@triton.jit
def _scores(qn, qr, kvn, kvr):
    """[BH, BK] fp32 q . k over the latent and rope parts (unscaled)."""
    return tl.dot(qn, tl.trans(kvn)) + tl.dot(qr, tl.trans(kvr))


@triton.jit
def _sparse_mla_fwd_kernel(q_ptr, kv_ptr, idx_ptr, o_ptr, lse_ptr, scale, L, K, H,
                           sq_t, sq_h, skv_b, skv_s, si_t, so_t, so_h, sl_t,
                           DV: tl.constexpr, DR: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr):
    pid_t, b, offs_h, hmask = _program(L, H, BH)
    offs_v = tl.arange(0, DV)
    qn, qr = _load_q(q_ptr, pid_t, offs_h, hmask, sq_t, sq_h, DV, DR)
    m = tl.full([BH], float("-inf"), dtype=tl.float32)
    den = tl.zeros([BH], dtype=tl.float32)
    acc = tl.zeros([BH, DV], dtype=tl.float32)
    c = scale * LOG2E
    for k0 in range(0, K, BK):
        valid, _, kvn, kvr = _gather(kv_ptr, idx_ptr, pid_t, b, k0, K, si_t, skv_b, skv_s, DV, DR, BK)
        s = _scores(qn, qr, kvn, kvr) * c
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        den = den * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kvn.dtype), kvn)
        m = m_new
    out = acc / tl.where(den > 0, den, 1.0)[:, None]
    lse = tl.where(den > 0, (m + tl.log2(den)) / LOG2E, float("inf"))
    tl.store(o_ptr + pid_t * so_t + offs_h[:, None] * so_h + offs_v[None, :], out.to(o_ptr.dtype.element_ty),
             mask=hmask[:, None])
    tl.store(lse_ptr + pid_t * sl_t + offs_h, lse, mask=hmask)


@triton.jit
def _sparse_mla_probs_kernel(q_ptr, kv_ptr, idx_ptr, lse_ptr, p_ptr, o_ptr, scale, L, K, H,
                             sq_t, sq_h, skv_b, skv_s, si_t, sl_t, sp_t, so_t, so_h,
                             DV: tl.constexpr, DR: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                             OUT: tl.constexpr):
    """p[t, k] += sum over this program's BH heads of softmax probabilities / H (atomics across head blocks),
    from the log-sum-exp. With OUT, also the attention output in the same pass (the log-sum-exp being known,
    no online softmax): the checkpoint recomputation's forward."""
    pid_t, b, offs_h, hmask = _program(L, H, BH)
    qn, qr = _load_q(q_ptr, pid_t, offs_h, hmask, sq_t, sq_h, DV, DR)
    lse = tl.load(lse_ptr + pid_t * sl_t + offs_h, mask=hmask, other=float("inf"))
    acc = tl.zeros([BH, DV], dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        valid, _, kvn, kvr = _gather(kv_ptr, idx_ptr, pid_t, b, k0, K, si_t, skv_b, skv_s, DV, DR, BK)
        s = _scores(qn, qr, kvn, kvr) * scale
        p = tl.where(hmask[:, None] & valid[None, :], tl.exp(s - lse[:, None]), 0.0)
        if OUT:
            acc += tl.dot(p.to(kvn.dtype), kvn)
        tl.atomic_add(p_ptr + pid_t * sp_t + offs_k, tl.sum(p, 0) / H, mask=offs_k < K, sem="relaxed")
    if OUT:
        offs_v = tl.arange(0, DV)
        tl.store(o_ptr + pid_t * so_t + offs_h[:, None] * so_h + offs_v[None, :], acc.to(o_ptr.dtype.element_ty),
                 mask=hmask[:, None])


@triton.jit
def _sparse_mla_bwd_kernel(q_ptr, kv_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dkv_ptr, scale, L, K, H,
                           sq_t, sq_h, skv_b, skv_s, si_t, sdo_t, sdo_h, sl_t, sdq_t, sdq_h, sdkv_b, sdkv_s,
                           DV: tl.constexpr, DR: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr):
    pid_t, b, offs_h, hmask = _program(L, H, BH)
    offs_v = tl.arange(0, DV)
    offs_r = tl.arange(0, DR)
    qn, qr = _load_q(q_ptr, pid_t, offs_h, hmask, sq_t, sq_h, DV, DR)
    do = tl.load(do_ptr + pid_t * sdo_t + offs_h[:, None] * sdo_h + offs_v[None, :], mask=hmask[:, None], other=0.0)
    lse = tl.load(lse_ptr + pid_t * sl_t + offs_h, mask=hmask, other=float("inf"))
    delta = tl.load(delta_ptr + pid_t * sl_t + offs_h, mask=hmask, other=0.0)
    dqn = tl.zeros([BH, DV], dtype=tl.float32)
    dqr = tl.zeros([BH, DR], dtype=tl.float32)
    for k0 in range(0, K, BK):
        valid, safe, kvn, kvr = _gather(kv_ptr, idx_ptr, pid_t, b, k0, K, si_t, skv_b, skv_s, DV, DR, BK)
        s = _scores(qn, qr, kvn, kvr) * scale
        p = tl.where(valid[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(kvn))
        ds = (p * (dp - delta[:, None]) * scale).to(qn.dtype)
        dqn += tl.dot(ds, kvn)
        dqr += tl.dot(ds, kvr)
        dsT = tl.trans(ds)
        dkvn = tl.dot(dsT, qn) + tl.dot(tl.trans(p.to(do.dtype)), do)
        dkvr = tl.dot(dsT, qr)
        drow = dkv_ptr + b * sdkv_b + safe * sdkv_s
        tl.atomic_add(drow[:, None] + offs_v[None, :], dkvn, mask=valid[:, None], sem="relaxed")
        tl.atomic_add(drow[:, None] + DV + offs_r[None, :], dkvr, mask=valid[:, None], sem="relaxed")
    dq_base = dq_ptr + pid_t * sdq_t + offs_h[:, None] * sdq_h
    tl.store(dq_base + offs_v[None, :], dqn.to(dq_ptr.dtype.element_ty), mask=hmask[:, None])
    tl.store(dq_base + DV + offs_r[None, :], dqr.to(dq_ptr.dtype.element_ty), mask=hmask[:, None])


KERNELS = (_sparse_mla_fwd_kernel, _sparse_mla_probs_kernel, _sparse_mla_bwd_kernel)  # what a profile reads


def _shapes(q, kv, idx, v_dim):
    B, L, H, D = q.shape
    K = idx.shape[-1]
    return B, L, H, D, K, v_dim, D - v_dim


# Launch configurations, Triton's own names (head and key blocks, warps, stages): the fastest of `python -m bench
# --sweep sparse_mla` on the H200 (d_qk 576, top-2048), for DeepSeek-V3's 128 heads (at L = 16K) and for one head
# block of 16 (--sweep-heads 16, L = 64K: the 1B model; larger key blocks, fewer warps).
CONFIGS = {
    "fwd": (dict(BH=64, BK=64, num_warps=8, num_stages=2), dict(BH=16, BK=128, num_warps=4, num_stages=2)),
    "probs": (dict(BH=64, BK=64, num_warps=4, num_stages=2), dict(BH=16, BK=64, num_warps=4, num_stages=2)),
    "bwd": (dict(BH=32, BK=32, num_warps=8, num_stages=2), dict(BH=16, BK=16, num_warps=4, num_stages=2)),
}
CONFIGS["fwd_given_lse"] = CONFIGS["fwd"]  # not swept separately: the forward's loop plus the probabilities' atomics


def _launch(kind: str, B: int, L: int, H: int, BH, BK, num_warps, num_stages):
    """(grid, BH, BK, num_warps, num_stages) for `kind` at H heads: CONFIGS' entry, the caller's non-None choices on
    top, BH fitted to H."""
    cfg = {**CONFIGS[kind][1 if H <= 16 else 0],
           **{k: v for k, v in dict(BH=BH, BK=BK, num_warps=num_warps, num_stages=num_stages).items() if v is not None}}
    BH = _block_h(H, cfg["BH"])
    return (triton.cdiv(H, BH) * B * L,), BH, cfg["BK"], cfg["num_warps"], cfg["num_stages"]


def sparse_mla_forward(q, kv, idx, scale: float, v_dim: int, BH: int | None = None, BK: int | None = None,
                       num_warps: int | None = None, num_stages: int | None = None):
    """(out [B, L, H, v_dim] in q's dtype, lse [B, L, H] fp32 natural-log)."""
    B, L, H, D, K, DV, DR = _shapes(q, kv, idx, v_dim)
    grid, BH, BK, num_warps, num_stages = _launch("fwd", B, L, H, BH, BK, num_warps, num_stages)
    out = torch.empty(B, L, H, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, L, H, dtype=torch.float32, device=q.device)
    _sparse_mla_fwd_kernel[grid](q, kv, idx, out, lse, scale, L, K, H, q.stride(1), q.stride(2), kv.stride(0),
                                 kv.stride(1), idx.stride(1), out.stride(1), out.stride(2), lse.stride(1),
                                 DV=DV, DR=DR, BH=BH, BK=BK, num_warps=num_warps, num_stages=num_stages)
    return out, lse


def _probs(kind: str, q, kv, idx, lse, scale: float, v_dim: int, with_out: bool, BH, BK, num_warps, num_stages):
    """p [B, L, K] fp32 from the log-sum-exp, and with `with_out` the attention output first: (out, p)."""
    B, L, H, D, K, DV, DR = _shapes(q, kv, idx, v_dim)
    grid, BH, BK, num_warps, num_stages = _launch(kind, B, L, H, BH, BK, num_warps, num_stages)
    lse = lse.contiguous()
    p = torch.zeros(B, L, K, dtype=torch.float32, device=q.device)
    out = torch.empty(B, L, H, DV, dtype=q.dtype, device=q.device) if with_out else None
    o = out if with_out else p  # an unused pointer without OUT
    _sparse_mla_probs_kernel[grid](q, kv, idx, lse, p, o, scale, L, K, H, q.stride(1), q.stride(2), kv.stride(0),
                                   kv.stride(1), idx.stride(1), lse.stride(1), p.stride(1), o.stride(1),
                                   o.stride(2) if with_out else 0, DV=DV, DR=DR, BH=BH, BK=BK, OUT=with_out,
                                   num_warps=num_warps, num_stages=num_stages)
    return (out, p) if with_out else p


def sparse_mla_probs(q, kv, idx, lse, scale: float, v_dim: int, BH: int | None = None, BK: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None):
    """Head-averaged attention probabilities over the selected set, [B, L, K] fp32 (0 where idx = -1)."""
    return _probs("probs", q, kv, idx, lse, scale, v_dim, False, BH, BK, num_warps, num_stages)


def sparse_mla_forward_given_lse(q, kv, idx, lse, scale: float, v_dim: int):
    """(out, p) of `sparse_mla_forward` and `sparse_mla_probs` in one pass, from their log-sum-exp `lse`."""
    return _probs("fwd_given_lse", q, kv, idx, lse, scale, v_dim, True, None, None, None, None)


def sparse_mla_backward(q, kv, idx, out, lse, grad_out, scale: float, v_dim: int, BH: int | None = None,
                        BK: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                        dkv_acc=None):
    """(dq like q, dkv like kv); given `dkv_acc` (fp32, like kv), the latent-row gradients are added into it and it
    is returned instead (a caller that runs the backward in query chunks sums them in fp32)."""
    B, L, H, D, K, DV, DR = _shapes(q, kv, idx, v_dim)
    grid, BH, BK, num_warps, num_stages = _launch("bwd", B, L, H, BH, BK, num_warps, num_stages)
    grad_out = grad_out.contiguous()
    delta = common.row_dot(grad_out, out, torch.empty(B, L, H, dtype=torch.float32, device=q.device))
    dq = torch.empty_like(q)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device) if dkv_acc is None else dkv_acc
    _sparse_mla_bwd_kernel[grid](q, kv, idx, grad_out, lse, delta, dq, dkv, scale, L, K, H, q.stride(1),
                                 q.stride(2), kv.stride(0), kv.stride(1), idx.stride(1), grad_out.stride(1),
                                 grad_out.stride(2), lse.stride(1), dq.stride(1), dq.stride(2), dkv.stride(0),
                                 dkv.stride(1), DV=DV, DR=DR, BH=BH, BK=BK, num_warps=num_warps,
                                 num_stages=num_stages)
    return dq, (dkv.to(kv.dtype) if dkv_acc is None else dkv)


SparseMLA = sparse_mla_function(sys.modules[__name__])


def sparse_mla(q_BLHD, kv_BLD, idx_BLK, scale: float, v_dim: int, lse_BLH=None, probs: bool = True):
    """Same contract as `ops.sparse_mla`: (out [B, L, H, v_dim], p [B, L, K] fp32, lse [B, L, H] fp32);
    given `lse_BLH` (from a forward on the same inputs) the output and p come from one pass."""
    return SparseMLA.apply(q_BLHD, kv_BLD, idx_BLK, scale, v_dim, lse_BLH, probs)
