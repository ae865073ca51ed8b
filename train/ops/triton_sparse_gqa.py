"""Sparse grouped-query attention on the GPU (Triton); twin: `reference.sparse_gqa`.

One program serves one query token and one key head j: it gathers each selected key and value row of head j
once per key block and uses them for all of that head's BH query heads (h = j * R .. j * R + R - 1, R = H / J,
padded to at least 16 rows for tl.dot), with an online softmax in fp32. Forward writes the output and the per-head
log-sum-exp; a second kernel turns the log-sum-exp into the head-averaged probabilities over the selected set
(the sparse indexer loss's target), or, given the log-sum-exp of an earlier forward (the checkpoint
recomputation), gives the output and the probabilities in one pass. Backward recomputes the scores from the
log-sum-exp and scatters the key and value gradients with fp32 atomics. Invalid selections (-1) are masked; a
query with none gets a zero output.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from train.ops import common
from train.ops.autograd import sparse_gqa_function

LOG2E = tl.constexpr(common.LOG2E)  # usable inside the kernels


@triton.jit
def _program(L, J, R, BH: tl.constexpr):
    """This program's token row pid_t = b * L + t (int64), batch index, key head j, query heads and their mask.
    The key heads of a token are neighbouring programs: they run side by side and share its selection in L2."""
    pid = tl.program_id(0).to(tl.int64)
    pid_t = pid // J
    j = pid % J
    rows = tl.arange(0, BH)
    return pid_t, pid_t // L, j, j * R + rows, rows < R


@triton.jit
def _gather(k_ptr, v_ptr, idx_ptr, pid_t, b, j, k0, K, si_t, sk_b, sk_s, sk_j, sv_b, sv_s, sv_j,
            D: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr):
    """Selections k0..k0+BK of token pid_t: (valid, row index with 0 for invalid, key rows, value rows) of head j."""
    offs_k = k0 + tl.arange(0, BK)
    ids = tl.load(idx_ptr + pid_t * si_t + offs_k, mask=offs_k < K, other=-1).to(tl.int64)
    valid = ids >= 0
    safe = tl.where(valid, ids, 0)
    kr = tl.load(k_ptr + b * sk_b + j * sk_j + safe[:, None] * sk_s + tl.arange(0, D)[None, :], mask=valid[:, None],
                 other=0.0)
    vr = tl.load(v_ptr + b * sv_b + j * sv_j + safe[:, None] * sv_s + tl.arange(0, DV)[None, :],
                 mask=valid[:, None], other=0.0)
    return valid, safe, kr, vr


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, o_ptr, lse_ptr, scale, L, K, J, R,
                sq_t, sq_h, sk_b, sk_s, sk_j, sv_b, sv_s, sv_j, si_t, so_t, so_h, sl_t,
                D: tl.constexpr, DV: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr):
    pid_t, b, j, offs_h, hmask = _program(L, J, R, BH)
    offs_v = tl.arange(0, DV)
    q = tl.load(q_ptr + pid_t * sq_t + offs_h[:, None] * sq_h + tl.arange(0, D)[None, :], mask=hmask[:, None],
                other=0.0)
    m = tl.full([BH], float("-inf"), dtype=tl.float32)
    den = tl.zeros([BH], dtype=tl.float32)
    acc = tl.zeros([BH, DV], dtype=tl.float32)
    c = scale * LOG2E
    for k0 in range(0, K, BK):
        valid, _, kr, vr = _gather(k_ptr, v_ptr, idx_ptr, pid_t, b, j, k0, K, si_t, sk_b, sk_s, sk_j, sv_b, sv_s,
                                   sv_j, D, DV, BK)
        s = tl.dot(q, tl.trans(kr)) * c
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        den = den * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vr.dtype), vr)
        m = m_new
    out = acc / tl.where(den > 0, den, 1.0)[:, None]
    lse = tl.where(den > 0, (m + tl.log2(den)) / LOG2E, float("inf"))
    tl.store(o_ptr + pid_t * so_t + offs_h[:, None] * so_h + offs_v[None, :], out.to(o_ptr.dtype.element_ty),
             mask=hmask[:, None])
    tl.store(lse_ptr + pid_t * sl_t + offs_h, lse, mask=hmask)


@triton.jit
def _probs_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, lse_ptr, p_ptr, o_ptr, scale, L, K, J, R, H,
                  sq_t, sq_h, sk_b, sk_s, sk_j, sv_b, sv_s, sv_j, si_t, sl_t, sp_t, so_t, so_h,
                  D: tl.constexpr, DV: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, OUT: tl.constexpr):
    """p[t, k] += this key head's query heads' softmax probabilities / H (atomics across key heads), from the
    log-sum-exp; with OUT, also the attention output in the same pass (the checkpoint recomputation's forward)."""
    pid_t, b, j, offs_h, hmask = _program(L, J, R, BH)
    q = tl.load(q_ptr + pid_t * sq_t + offs_h[:, None] * sq_h + tl.arange(0, D)[None, :], mask=hmask[:, None],
                other=0.0)
    lse = tl.load(lse_ptr + pid_t * sl_t + offs_h, mask=hmask, other=float("inf"))
    acc = tl.zeros([BH, DV], dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        valid, _, kr, vr = _gather(k_ptr, v_ptr, idx_ptr, pid_t, b, j, k0, K, si_t, sk_b, sk_s, sk_j, sv_b, sv_s,
                                   sv_j, D, DV, BK)
        s = tl.dot(q, tl.trans(kr)) * scale
        p = tl.where(hmask[:, None] & valid[None, :], tl.exp(s - lse[:, None]), 0.0)
        if OUT:
            acc += tl.dot(p.to(vr.dtype), vr)
        tl.atomic_add(p_ptr + pid_t * sp_t + offs_k, tl.sum(p, 0) / H, mask=offs_k < K, sem="relaxed")
    if OUT:
        offs_v = tl.arange(0, DV)
        tl.store(o_ptr + pid_t * so_t + offs_h[:, None] * so_h + offs_v[None, :], acc.to(o_ptr.dtype.element_ty),
                 mask=hmask[:, None])


@triton.jit
def _bwd_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr, scale, L, K, J, R,
                sq_t, sq_h, sk_b, sk_s, sk_j, sv_b, sv_s, sv_j, si_t, sdo_t, sdo_h, sl_t, sdq_t, sdq_h,
                sdk_b, sdk_s, sdk_j, sdv_b, sdv_s, sdv_j,
                D: tl.constexpr, DV: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr):
    pid_t, b, j, offs_h, hmask = _program(L, J, R, BH)
    offs_d = tl.arange(0, D)
    offs_v = tl.arange(0, DV)
    q = tl.load(q_ptr + pid_t * sq_t + offs_h[:, None] * sq_h + offs_d[None, :], mask=hmask[:, None], other=0.0)
    do = tl.load(do_ptr + pid_t * sdo_t + offs_h[:, None] * sdo_h + offs_v[None, :], mask=hmask[:, None], other=0.0)
    lse = tl.load(lse_ptr + pid_t * sl_t + offs_h, mask=hmask, other=float("inf"))
    delta = tl.load(delta_ptr + pid_t * sl_t + offs_h, mask=hmask, other=0.0)
    dq = tl.zeros([BH, D], dtype=tl.float32)
    for k0 in range(0, K, BK):
        valid, safe, kr, vr = _gather(k_ptr, v_ptr, idx_ptr, pid_t, b, j, k0, K, si_t, sk_b, sk_s, sk_j, sv_b, sv_s,
                                      sv_j, D, DV, BK)
        s = tl.dot(q, tl.trans(kr)) * scale
        p = tl.where(hmask[:, None] & valid[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vr))
        ds = (p * (dp - delta[:, None]) * scale).to(q.dtype)
        dq += tl.dot(ds, kr)
        dk = tl.dot(tl.trans(ds), q)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do)
        tl.atomic_add(dk_ptr + b * sdk_b + j * sdk_j + safe[:, None] * sdk_s + offs_d[None, :], dk,
                      mask=valid[:, None], sem="relaxed")
        tl.atomic_add(dv_ptr + b * sdv_b + j * sdv_j + safe[:, None] * sdv_s + offs_v[None, :], dv,
                      mask=valid[:, None], sem="relaxed")
    tl.store(dq_ptr + pid_t * sdq_t + offs_h[:, None] * sdq_h + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=hmask[:, None])


KERNELS = (_fwd_kernel, _probs_kernel, _bwd_kernel)  # what a profile reads

# Launch configurations, Triton's own names (key block, warps, stages); the head block is the group size R.
CONFIGS = {"fwd": dict(BK=64, num_warps=4, num_stages=2), "probs": dict(BK=64, num_warps=4, num_stages=2),
           "bwd": dict(BK=32, num_warps=4, num_stages=2)}


def _dims(q, k, v, idx):
    B, L, H, D = q.shape
    J = k.shape[2]
    R = H // J
    return B, L, H, D, J, R, v.shape[-1], idx.shape[-1], max(16, triton.next_power_of_2(R))


def _strides(k, v):
    return k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2)


def sparse_gqa_forward(q, k, v, idx, scale: float):
    """(out [B, L, H, V] in q's dtype, lse [B, L, H] fp32 natural-log)."""
    B, L, H, D, J, R, DV, K, BH = _dims(q, k, v, idx)
    out = torch.empty(B, L, H, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, L, H, dtype=torch.float32, device=q.device)
    cfg = CONFIGS["fwd"]
    _fwd_kernel[(B * L * J,)](q, k, v, idx, out, lse, scale, L, K, J, R, q.stride(1), q.stride(2), *_strides(k, v),
                              idx.stride(1), out.stride(1), out.stride(2), lse.stride(1), D=D, DV=DV, BH=BH,
                              **cfg)
    return out, lse


def _probs(q, k, v, idx, lse, scale: float, with_out: bool):
    B, L, H, D, J, R, DV, K, BH = _dims(q, k, v, idx)
    lse = lse.contiguous()
    p = torch.zeros(B, L, K, dtype=torch.float32, device=q.device)
    out = torch.empty(B, L, H, DV, dtype=q.dtype, device=q.device) if with_out else None
    o = out if with_out else p  # an unused pointer without OUT
    cfg = CONFIGS["probs"]
    _probs_kernel[(B * L * J,)](q, k, v, idx, lse, p, o, scale, L, K, J, R, H, q.stride(1), q.stride(2),
                                *_strides(k, v), idx.stride(1), lse.stride(1), p.stride(1), o.stride(1),
                                o.stride(2) if with_out else 0, D=D, DV=DV, BH=BH, OUT=with_out, **cfg)
    return (out, p) if with_out else p


def sparse_gqa_probs(q, k, v, idx, lse, scale: float):
    """Head-averaged attention probabilities over the selected set, [B, L, K] fp32 (0 where idx = -1)."""
    return _probs(q, k, v, idx, lse, scale, False)


def sparse_gqa_forward_given_lse(q, k, v, idx, lse, scale: float):
    """(out, p) of `sparse_gqa_forward` and `sparse_gqa_probs` in one pass, from their log-sum-exp `lse`."""
    return _probs(q, k, v, idx, lse, scale, True)


def sparse_gqa_backward(q, k, v, idx, out, lse, grad_out, scale: float):
    """(dq like q, dk like k, dv like v)."""
    B, L, H, D, J, R, DV, K, BH = _dims(q, k, v, idx)
    grad_out = grad_out.contiguous()
    delta = common.row_dot(grad_out, out, torch.empty(B, L, H, dtype=torch.float32, device=q.device))
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    cfg = CONFIGS["bwd"]
    _bwd_kernel[(B * L * J,)](q, k, v, idx, grad_out, lse, delta, dq, dk, dv, scale, L, K, J, R, q.stride(1),
                              q.stride(2), *_strides(k, v), idx.stride(1), grad_out.stride(1), grad_out.stride(2),
                              lse.stride(1), dq.stride(1), dq.stride(2), *_strides(dk, dv), D=D, DV=DV, BH=BH,
                              **cfg)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


SparseGQA = sparse_gqa_function(sys.modules[__name__])


def sparse_gqa(q_BLHD, k_BSJD, v_BSJV, idx_BLK, scale: float, lse_BLH=None, probs: bool = True):
    """Same contract as `ops.sparse_gqa`: (out [B, L, H, V], p [B, L, K] fp32, lse [B, L, H] fp32); given
    `lse_BLH` (from a forward on the same inputs) the output and p come from one pass."""
    return SparseGQA.apply(q_BLHD, k_BSJD, v_BSJV, idx_BLK, scale, lse_BLH, probs)
