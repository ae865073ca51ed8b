"""Sparse-stage indexer loss on the GPU (Triton); twin: `reference.sparse_indexer_kl`.

One program per query token: it gathers the indexer keys of the selected rows in blocks, scores them
with all G indexer heads at once (relu, weights, head sum; G is padded to a power of two >= 16 for tl.dot,
the padding heads masked to zero), and keeps an online log-sum-exp, so the KL
    KL(p || softmax(I)) = sum p log p - sum p I + (sum p) * logsumexp(I)
needs one pass. Backward recomputes the scores; dI = (sum p) * softmax(I) - p; the key gradient is
scattered with fp32 atomics. Memory: O(L) besides the inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _load_qw(q_ptr, w_ptr, pid, sq_t, sq_g, sw_t, G, D: tl.constexpr, BG: tl.constexpr):
    """Token pid's [BG, D] indexer queries and [BG] fp32 weights; heads >= G (padding) are zero."""
    offs_g = tl.arange(0, BG)
    gmask = offs_g < G
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + pid * sq_t + offs_g[:, None] * sq_g + offs_d[None, :], mask=gmask[:, None], other=0.0)
    w = tl.load(w_ptr + pid * sw_t + offs_g, mask=gmask, other=0.0).to(tl.float32)
    return q, w, offs_g, gmask, offs_d


@triton.jit
def _indexer_kl_fwd_kernel(q_ptr, k_ptr, w_ptr, idx_ptr, p_ptr, kl_ptr, lse_ptr, ptot_ptr, L, K,
                           sq_t, sq_g, sk_b, sk_s, sw_t, si_t, sp_t,
                           G, D: tl.constexpr, BG: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # b * L + t
    b = pid // L
    q, w, offs_g, gmask, offs_d = _load_qw(q_ptr, w_ptr, pid, sq_t, sq_g, sw_t, G, D, BG)
    m = float("-inf")
    den = 0.0
    plogp = 0.0
    p_dot_i = 0.0
    ptot = 0.0
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        ids = tl.load(idx_ptr + pid * si_t + offs_k, mask=offs_k < K, other=-1).to(tl.int64)
        valid = ids >= 0
        keys = tl.load(k_ptr + b * sk_b + tl.where(valid, ids, 0)[:, None] * sk_s + offs_d[None, :],
                       mask=valid[:, None], other=0.0)
        logit = tl.sum(tl.maximum(tl.dot(q, tl.trans(keys)), 0.0) * w[:, None], 0)  # [BK]
        pk = tl.load(p_ptr + pid * sp_t + offs_k, mask=valid, other=0.0).to(tl.float32)
        plogp += tl.sum(tl.where(pk > 0, pk * tl.log(tl.where(pk > 0, pk, 1.0)), 0.0), 0)
        p_dot_i += tl.sum(tl.where(valid, pk * logit, 0.0), 0)
        ptot += tl.sum(pk, 0)
        logit = tl.where(valid, logit, float("-inf"))
        m_new = tl.maximum(m, tl.max(logit, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        den = den * tl.exp(m - m_safe) + tl.sum(tl.exp(logit - m_safe), 0)
        m = m_new
    lse = tl.where(den > 0, m + tl.log(tl.where(den > 0, den, 1.0)), 0.0)
    kl = plogp - p_dot_i + ptot * lse
    tl.store(kl_ptr + pid, tl.where(den > 0, kl, 0.0))
    tl.store(lse_ptr + pid, lse)
    tl.store(ptot_ptr + pid, ptot)


@triton.jit
def _indexer_kl_bwd_kernel(q_ptr, k_ptr, w_ptr, idx_ptr, p_ptr, lse_ptr, ptot_ptr, dkl_ptr, dq_ptr, dk_ptr, dw_ptr,
                           L, K, sq_t, sq_g, sk_b, sk_s, sw_t, si_t, sp_t, sdk_b, sdk_s,
                           G, D: tl.constexpr, BG: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // L
    q, w, offs_g, gmask, offs_d = _load_qw(q_ptr, w_ptr, pid, sq_t, sq_g, sw_t, G, D, BG)
    lse = tl.load(lse_ptr + pid)
    ptot = tl.load(ptot_ptr + pid)
    g = tl.load(dkl_ptr + pid)
    dq = tl.zeros([BG, D], dtype=tl.float32)
    dw = tl.zeros([BG], dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        ids = tl.load(idx_ptr + pid * si_t + offs_k, mask=offs_k < K, other=-1).to(tl.int64)
        valid = ids >= 0
        safe = tl.where(valid, ids, 0)
        keys = tl.load(k_ptr + b * sk_b + safe[:, None] * sk_s + offs_d[None, :], mask=valid[:, None], other=0.0)
        raw = tl.dot(q, tl.trans(keys))  # [BG, BK]
        relu = tl.maximum(raw, 0.0)
        logit = tl.sum(relu * w[:, None], 0)
        pk = tl.load(p_ptr + pid * sp_t + offs_k, mask=valid, other=0.0).to(tl.float32)
        dlogit = tl.where(valid, g * (ptot * tl.exp(logit - lse) - pk), 0.0)  # [BK]
        dw += tl.sum(relu * dlogit[None, :], 1)
        dscore = tl.where(raw > 0, w[:, None] * dlogit[None, :], 0.0).to(q.dtype)  # [BG, BK]
        dq += tl.dot(dscore, keys)
        dkeys = tl.dot(tl.trans(dscore), q)  # [BK, D]
        tl.atomic_add(dk_ptr + b * sdk_b + safe[:, None] * sdk_s + offs_d[None, :], dkeys, mask=valid[:, None],
                      sem="relaxed")
    tl.store(dq_ptr + pid * sq_t + offs_g[:, None] * sq_g + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=gmask[:, None])
    tl.store(dw_ptr + pid * sw_t + offs_g, dw.to(dw_ptr.dtype.element_ty), mask=gmask)


def _block_g(G: int) -> int:
    """Heads per tile: G rounded up to a power of two, at least 16 (tl.dot's smallest M)."""
    return max(16, triton.next_power_of_2(G))


class SparseIndexerKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qi, ki, wi, idx, p, BK=64):
        qi, ki, wi, idx, p = (t.contiguous() for t in (qi, ki, wi, idx, p))
        ctx.k_dtype = ki.dtype
        if ki.dtype != qi.dtype:
            ki = ki.to(qi.dtype)
        B, L, G, D = qi.shape
        K = idx.shape[-1]
        kl = torch.empty(B, L, dtype=torch.float32, device=qi.device)
        lse, ptot = torch.empty_like(kl), torch.empty_like(kl)
        _indexer_kl_fwd_kernel[(B * L,)](qi, ki, wi, idx, p, kl, lse, ptot, L, K, qi.stride(1), qi.stride(2),
                                         ki.stride(0), ki.stride(1), wi.stride(1), idx.stride(1), p.stride(1), G,
                                         D=D, BG=_block_g(G), BK=BK, num_warps=4, num_stages=2)
        ctx.save_for_backward(qi, ki, wi, idx, p, lse, ptot)
        ctx.BK = BK
        return kl

    @staticmethod
    def backward(ctx, dkl):
        qi, ki, wi, idx, p, lse, ptot = ctx.saved_tensors
        B, L, G, D = qi.shape
        dkl = dkl.float().contiguous()
        dq, dw = torch.empty_like(qi), torch.empty_like(wi)
        dk = torch.zeros(ki.shape, dtype=torch.float32, device=ki.device)
        _indexer_kl_bwd_kernel[(B * L,)](qi, ki, wi, idx, p, lse, ptot, dkl, dq, dk, dw, L, idx.shape[-1],
                                         qi.stride(1), qi.stride(2), ki.stride(0), ki.stride(1), wi.stride(1),
                                         idx.stride(1), p.stride(1), dk.stride(0), dk.stride(1), G, D=D,
                                         BG=_block_g(G), BK=ctx.BK, num_warps=4, num_stages=2)
        return dq, dk.to(ctx.k_dtype), dw, None, None, None


def sparse_indexer_kl(qi_BLGD, ki_BLD, wi_BLG, idx_BLK, p_BLK):
    """Same contract as `reference.sparse_indexer_kl`: kl [B, L] fp32, differentiable w.r.t. qi, ki, wi."""
    return SparseIndexerKL.apply(qi_BLGD, ki_BLD, wi_BLG, idx_BLK, p_BLK.detach())
