"""TileLang's sparse MLA forward kernels and their host code: the warp-specialised forward (also the checkpoint
recomputation's one pass given the log-sum-exp), the one-kernel forward for smaller head blocks, and the
probabilities over the selection. Backend: train/ops/tilelang_sparse_mla.py."""

from __future__ import annotations

import tilelang
import torch
from tilelang import language as T

from train.ops.common import LN2, LOG2E
from train.ops.tilelang_sparse_mla_common import (
    PASS_CONFIGS,
    WS_THREADS,
    _config,
    _gather_ring,
    _online_softmax_step,
    _padded,
    _score_gemm,
    _store_through,
    head_block,
    warp_specialised,
)

@tilelang.jit(pass_configs=PASS_CONFIGS)
def _fwd_kernel(Q, KV, Idx, heads, dv, dr, topk, scale, block_k, num_stages, threads):
    B, L, S = T.dynamic("B"), T.dynamic("L"), T.dynamic("S")  # S: latent rows (all L, or more)
    BH = head_block(heads)
    NH, NK, c = heads // BH, topk // block_k, scale * LOG2E
    Q: T.Tensor([B, L, heads, dv + dr], T.bfloat16)  # noqa: F811 -- TileLang's annotation of the argument
    KV: T.Tensor([B, S, dv + dr], T.bfloat16)  # noqa: F811
    Idx: T.Tensor([B, L, topk], T.int32)  # noqa: F811
    Out = T.empty([B, L, heads, dv], T.bfloat16)
    Lse = T.empty([B, L, heads], T.float32)

    with T.Kernel(L * NH, B, threads=threads) as (bx, b):
        t, h0 = bx // NH, (bx % NH) * BH
        q_s = T.alloc_shared([BH, dv], T.bfloat16)
        qr_s = T.alloc_shared([BH, dr], T.bfloat16)
        kv_s = T.alloc_shared([block_k, dv], T.bfloat16)
        kr_s = T.alloc_shared([block_k, dr], T.bfloat16)
        p_s = T.alloc_shared([BH, block_k], T.bfloat16)
        valid = T.alloc_fragment([block_k], "bool")
        acc_s = T.alloc_fragment([BH, block_k], T.float32)
        acc_o = T.alloc_fragment([BH, dv], T.float32)
        m = T.alloc_fragment([BH], T.float32)
        m_prev = T.alloc_fragment([BH], T.float32)
        den = T.alloc_fragment([BH], T.float32)
        den_blk = T.alloc_fragment([BH], T.float32)
        alpha = T.alloc_fragment([BH], T.float32)
        T.fill(acc_o, 0)
        T.fill(den, 0)
        T.fill(m, -(2**30))  # finite: a block with no valid key leaves it, and exp2(-inf - m) is 0, not NaN
        T.copy(Q[b, t, h0 : h0 + BH, :dv], q_s)
        T.copy(Q[b, t, h0 : h0 + BH, dv:], qr_s)
        for kb in T.Pipelined(NK, num_stages=num_stages):
            for j in T.Parallel(block_k):
                valid[j] = Idx[b, t, kb * block_k + j] >= 0
            for j, d in T.Parallel(block_k, dv):
                kv_s[j, d] = KV[b, T.max(Idx[b, t, kb * block_k + j], 0), d]
            for j, d in T.Parallel(block_k, dr):
                kr_s[j, d] = KV[b, T.max(Idx[b, t, kb * block_k + j], 0), dv + d]
            for h, j in T.Parallel(BH, block_k):
                acc_s[h, j] = T.if_then_else(valid[j], 0, -T.infinity(acc_s.dtype))
            T.gemm(q_s, kv_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
            T.gemm(qr_s, kr_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
            _online_softmax_step(acc_s, acc_o, m, m_prev, alpha, den, den_blk, c)
            T.copy(acc_s, p_s)
            T.gemm(p_s, kv_s, acc_o, policy=T.GemmWarpPolicy.FullRow)
        for h, d in T.Parallel(BH, dv):
            acc_o[h, d] = T.if_then_else(den[h] > 0, acc_o[h, d] / den[h], 0)
        for h in T.Parallel(BH):
            den[h] = T.if_then_else(den[h] > 0, (T.log2(den[h]) + m[h] * c) * LN2, T.infinity(den.dtype))
        T.copy(acc_o, Out[b, t, h0 : h0 + BH, :])
        T.copy(den, Lse[b, t, h0 : h0 + BH])
    return Out, Lse


@tilelang.jit(pass_configs=PASS_CONFIGS)
def _ws_kernel(Q, KV, Idx, Lse, P, heads, true_heads, dv, dr, topk, scale, given_lse, block_k, num_stages):
    """Sparse MLA for one query token and 64 heads in three warpgroups.

    The producer (threads 256-383) gathers the selected latent rows of each key block with asynchronous copies
    into a ring of `num_stages` shared-memory slots; a slot's `full` barrier completes when its copies land, its
    `free` barrier when both consumers are done with it. Consumer 0 (threads 0-127) scores the block against
    all of d_qk, runs the softmax, hands the probabilities (and the rescale factor) to consumer 1 through
    shared memory, and accumulates the first half of the value dims; consumer 1 (threads 128-255) accumulates
    the second half. `p_full` / `p_free` pass the probability tile between them, one block at a time. The
    queries arrive by TMA (`q_ready`) while the producer starts on the first block. At the end each consumer
    stores its half of the output through the queries' shared memory, which no GEMM reads after consumer 0's
    last score GEMM (consumer 1 only gets there after it).

    Forward (`given_lse` false): online softmax; returns (out, lse). With `given_lse`: probabilities from the
    given log-sum-exp, P [B, L, topk] += their head average (zeros in); returns out."""
    B, L, S = T.dynamic("B"), T.dynamic("L"), T.dynamic("S")  # S: latent rows (all L, or more)
    BH, BK, NS, D, HV = 64, block_k, num_stages, dv + dr, dv // 2
    NH, NR, c, inv_h = heads // BH, topk // (block_k * num_stages), scale * LOG2E, 1.0 / true_heads
    Q: T.Tensor([B, L, heads, D], T.bfloat16)  # noqa: F811
    KV: T.Tensor([B, S, D], T.bfloat16)  # noqa: F811
    Idx: T.Tensor([B, L, topk], T.int32)  # noqa: F811
    Lse: T.Tensor([B, L, heads] if given_lse else [1], T.float32)  # noqa: F811 -- placeholder in the forward
    P: T.Tensor([B, L, topk] if given_lse else [1], T.float32)  # noqa: F811
    Out = T.empty([B, L, heads, dv], T.bfloat16)
    LseOut = T.empty([1] if given_lse else [B, L, heads], T.float32)

    with T.Kernel(L * NH, B, threads=WS_THREADS) as (bx, b):
        t, h0 = bx // NH, (bx % NH) * BH
        q_s = T.alloc_shared([BH, D], T.bfloat16)
        kv_s = T.alloc_shared([NS, BK, D], T.bfloat16)
        bias_s = T.alloc_shared([NS, BK], T.float32)
        p_s = T.alloc_shared([BH, BK], T.bfloat16)
        acc_s = T.alloc_fragment([BH, BK], T.float32)
        acc_lo = T.alloc_fragment([BH, HV], T.float32)
        acc_hi = T.alloc_fragment([BH, HV], T.float32)
        m = T.alloc_fragment([BH], T.float32)  # running max; with `given_lse`, the log-sum-exp (base 2, scaled)
        if given_lse:  # (every fragment allocated must be used: layout inference needs each one's uses)
            psum = T.alloc_fragment([BK], T.float32)
        else:
            alpha_s = T.alloc_shared([BH], T.float32)
            den_s = T.alloc_shared([BH], T.float32)
            m_prev = T.alloc_fragment([BH], T.float32)
            den = T.alloc_fragment([BH], T.float32)
            den_blk = T.alloc_fragment([BH], T.float32)
            alpha = T.alloc_fragment([BH], T.float32)
            done = T.alloc_barrier(arrive_count=128)
        q_ready = T.alloc_barrier(arrive_count=WS_THREADS)
        full = T.alloc_barrier(arrive_count=[128] * NS)
        free = T.alloc_barrier(arrive_count=[256] * NS)
        p_full = T.alloc_barrier(arrive_count=128)
        p_free = T.alloc_barrier(arrive_count=128)
        tx = T.get_thread_binding()
        T.tma_copy(Q[b, t, h0 : h0 + BH, :], q_s, barrier=q_ready)
        T.barrier_arrive(q_ready)
        if tx < 128:  # consumer 0: scores, softmax, value dims [0, dv/2)
            T.set_max_nreg(240, 1)
            T.fill(acc_lo, 0)
            if given_lse:
                T.copy(Lse[b, t, h0 : h0 + BH], m)
                for h in T.Parallel(BH):
                    m[h] = m[h] * LOG2E
            else:
                T.fill(den, 0)
                T.fill(m, -(2**30))  # finite: a block with no valid key leaves it, and exp2(-inf - m) is 0, not NaN
            T.barrier_wait(q_ready, 0)
            for r in T.serial(NR):
                for s in T.unroll(NS):
                    kb = r * NS + s
                    T.barrier_wait(full[s], r & 1)
                    for h, j in T.Parallel(BH, BK):
                        acc_s[h, j] = bias_s[s, j]
                    _score_gemm(q_s, kv_s, s, acc_s, dv)
                    if given_lse:
                        for h, j in T.Parallel(BH, BK):
                            acc_s[h, j] = T.exp2(acc_s[h, j] * c - m[h])
                        T.reduce_sum(acc_s, psum, dim=0)
                        for j in T.Parallel(BK):
                            if NH == 1:
                                P[b, t, kb * BK + j] = psum[j] * inv_h
                            else:
                                T.atomic_add(P[b, t, kb * BK + j], psum[j] * inv_h)
                        T.barrier_wait(p_free, (kb & 1) ^ 1)
                    else:
                        _online_softmax_step(acc_s, acc_lo, m, m_prev, alpha, den, den_blk, c)
                        T.barrier_wait(p_free, (kb & 1) ^ 1)
                        T.copy(alpha, alpha_s)
                    T.copy(acc_s, p_s)
                    T.fence_proxy_async()  # these writes before consumer 1's tensor-core reads
                    T.barrier_arrive(p_full)
                    T.gemm(p_s, kv_s[s, :, :HV], acc_lo)
                    T.barrier_arrive(free[s])
            if given_lse:
                _store_through(acc_lo, q_s[:, :HV], Out[b, t, h0 : h0 + BH, :HV])
            else:
                T.copy(den, den_s)
                T.barrier_arrive(done)
                for h, d in T.Parallel(BH, HV):
                    acc_lo[h, d] = T.if_then_else(den[h] > 0, acc_lo[h, d] / den[h], 0)
                for h in T.Parallel(BH):
                    den[h] = T.if_then_else(den[h] > 0, (T.log2(den[h]) + m[h] * c) * LN2, T.infinity(T.float32))
                _store_through(acc_lo, q_s[:, :HV], Out[b, t, h0 : h0 + BH, :HV])
                T.copy(den, LseOut[b, t, h0 : h0 + BH])
        elif tx < 256:  # consumer 1: value dims [dv/2, dv)
            T.set_max_nreg(168, 1)
            T.fill(acc_hi, 0)
            for r in T.serial(NR):
                for s in T.unroll(NS):
                    kb = r * NS + s
                    T.barrier_wait(p_full, kb & 1)
                    T.fence_proxy_async()
                    if not given_lse:
                        for h, d in T.Parallel(BH, HV):
                            acc_hi[h, d] = acc_hi[h, d] * alpha_s[h]
                    T.gemm(p_s, kv_s[s, :, HV:dv], acc_hi)
                    T.barrier_arrive(p_free)
                    T.barrier_arrive(free[s])
            if not given_lse:
                T.barrier_wait(done, 0)
                for h, d in T.Parallel(BH, HV):
                    acc_hi[h, d] = T.if_then_else(den_s[h] > 0, acc_hi[h, d] / den_s[h], 0)
            _store_through(acc_hi, q_s[:, HV:dv], Out[b, t, h0 : h0 + BH, HV:dv])
        else:
            T.set_max_nreg(80, 0)
            _gather_ring(KV, Idx, kv_s, full, free, b, t, tx - 256, NR, NS, BK, D, bias_s)
    return Out, LseOut  # LseOut: a placeholder with `given_lse`


@tilelang.jit(pass_configs=PASS_CONFIGS)
def _probs_kernel(Q, KV, Idx, Lse, P, heads, true_heads, dv, dr, topk, scale, with_out, block_k, num_stages,
                  threads):
    """P [B, L, topk] (zeros in, fp32): += the program's heads' probabilities / true_heads (atomically where
    several head blocks share a token); with `with_out`, also the attention output, from the same P."""
    B, L, S = T.dynamic("B"), T.dynamic("L"), T.dynamic("S")  # S: latent rows (all L, or more)
    BH = head_block(heads)
    NH, NK, c, inv_h = heads // BH, topk // block_k, scale * LOG2E, 1.0 / true_heads
    Q: T.Tensor([B, L, heads, dv + dr], T.bfloat16)  # noqa: F811
    KV: T.Tensor([B, S, dv + dr], T.bfloat16)  # noqa: F811
    Idx: T.Tensor([B, L, topk], T.int32)  # noqa: F811
    Lse: T.Tensor([B, L, heads], T.float32)  # noqa: F811
    P: T.Tensor([B, L, topk], T.float32)  # noqa: F811
    Out = T.empty([B, L, heads, dv] if with_out else [1], T.bfloat16)  # no output: a placeholder

    with T.Kernel(L * NH, B, threads=threads) as (bx, b):
        t, h0 = bx // NH, (bx % NH) * BH
        q_s = T.alloc_shared([BH, dv], T.bfloat16)
        qr_s = T.alloc_shared([BH, dr], T.bfloat16)
        kv_s = T.alloc_shared([block_k, dv], T.bfloat16)
        kr_s = T.alloc_shared([block_k, dr], T.bfloat16)
        valid = T.alloc_fragment([block_k], "bool")
        acc_s = T.alloc_fragment([BH, block_k], T.float32)
        lse2 = T.alloc_fragment([BH], T.float32)
        psum = T.alloc_fragment([block_k], T.float32)
        if with_out:
            p_s = T.alloc_shared([BH, block_k], T.bfloat16)
            acc_o = T.alloc_fragment([BH, dv], T.float32)
            T.fill(acc_o, 0)
        T.copy(Lse[b, t, h0 : h0 + BH], lse2)
        for h in T.Parallel(BH):
            lse2[h] = lse2[h] * LOG2E
        T.copy(Q[b, t, h0 : h0 + BH, :dv], q_s)
        T.copy(Q[b, t, h0 : h0 + BH, dv:], qr_s)
        for kb in T.Pipelined(NK, num_stages=num_stages):
            for j in T.Parallel(block_k):
                valid[j] = Idx[b, t, kb * block_k + j] >= 0
            for j, d in T.Parallel(block_k, dv):
                kv_s[j, d] = KV[b, T.max(Idx[b, t, kb * block_k + j], 0), d]
            for j, d in T.Parallel(block_k, dr):
                kr_s[j, d] = KV[b, T.max(Idx[b, t, kb * block_k + j], 0), dv + d]
            for h, j in T.Parallel(BH, block_k):
                acc_s[h, j] = T.if_then_else(valid[j], 0, -T.infinity(acc_s.dtype))
            T.gemm(q_s, kv_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
            T.gemm(qr_s, kr_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
            for h, j in T.Parallel(BH, block_k):
                acc_s[h, j] = T.exp2(acc_s[h, j] * c - lse2[h])
            T.reduce_sum(acc_s, psum, dim=0)
            for j in T.Parallel(block_k):
                if NH == 1:
                    P[b, t, kb * block_k + j] = psum[j] * inv_h
                else:
                    T.atomic_add(P[b, t, kb * block_k + j], psum[j] * inv_h)
            if with_out:
                T.copy(acc_s, p_s)
                T.gemm(p_s, kv_s, acc_o, policy=T.GemmWarpPolicy.FullRow)
        if with_out:
            T.copy(acc_o, Out[b, t, h0 : h0 + BH, :])
    return Out


def _ws(q, kv, idx, scale: float, v_dim: int, lse, block_k: int | None, num_stages: int | None):
    """The warp-specialised kernel: (out, lse) of the forward, or with `lse` given, (out, p)."""
    cfg = _config("ws", q.shape[2], block_k=block_k, num_stages=num_stages)
    qp, idxp, lsep, H, K = _padded(q, idx, cfg["block_k"] * cfg["num_stages"], None if lse is None else lse.float())
    D = q.shape[-1]
    given = lsep is not None
    p = torch.zeros(idxp.shape if given else (1,), dtype=torch.float32, device=q.device)
    out, lse_out = _ws_kernel(qp, kv.contiguous(), idxp, lsep if given else p, p, qp.shape[2], H, v_dim, D - v_dim,
                              idxp.shape[-1], scale, given, cfg["block_k"], cfg["num_stages"])
    return (out[:, :, :H], p[..., :K]) if given else (out[:, :, :H], lse_out[:, :, :H])


def sparse_mla_forward(q, kv, idx, scale: float, v_dim: int, block_k: int | None = None,
                       num_stages: int | None = None, threads: int | None = None):
    """(out [B, L, H, v_dim] bf16, lse [B, L, H] fp32 natural-log)."""
    if warp_specialised(q.shape[2], v_dim, q.shape[-1] - v_dim):
        return _ws(q, kv, idx, scale, v_dim, None, block_k, num_stages)
    return _plain_forward(q, kv, idx, scale, v_dim, block_k, num_stages, threads)


def _plain_forward(q, kv, idx, scale: float, v_dim: int, block_k: int | None = None, num_stages: int | None = None,
                   threads: int | None = None):
    """The forward in one kernel whose warpgroups share every role (head blocks below 64)."""
    cfg = _config("fwd", q.shape[2], block_k=block_k, num_stages=num_stages, threads=threads)
    qp, idxp, _, H, _ = _padded(q, idx, cfg["block_k"])
    D = q.shape[-1]
    out, lse = _fwd_kernel(qp, kv.contiguous(), idxp, qp.shape[2], v_dim, D - v_dim, idxp.shape[-1], scale,
                           cfg["block_k"], cfg["num_stages"], cfg["threads"])
    return out[:, :, :H], lse[:, :, :H]


def _probs(q, kv, idx, lse, scale: float, v_dim: int, with_out: bool, cfg: dict):
    qp, idxp, lsep, H, K = _padded(q, idx, cfg["block_k"], lse.float())
    D = q.shape[-1]
    p = torch.zeros(idxp.shape, dtype=torch.float32, device=q.device)
    out = _probs_kernel(qp, kv.contiguous(), idxp, lsep, p, qp.shape[2], H, v_dim, D - v_dim, idxp.shape[-1], scale,
                        with_out, cfg["block_k"], cfg["num_stages"], cfg["threads"])
    return (out[:, :, :H], p[..., :K]) if with_out else p[..., :K]


def sparse_mla_probs(q, kv, idx, lse, scale: float, v_dim: int, block_k: int | None = None,
                     num_stages: int | None = None, threads: int | None = None):
    """Head-averaged attention probabilities over the selected set, [B, L, K] fp32 (0 where idx = -1)."""
    cfg = _config("probs", q.shape[2], block_k=block_k, num_stages=num_stages, threads=threads)
    return _probs(q, kv, idx, lse, scale, v_dim, False, cfg)


def sparse_mla_forward_given_lse(q, kv, idx, lse, scale: float, v_dim: int):
    """(out, p) of `sparse_mla_forward` and `sparse_mla_probs` in one pass, from their log-sum-exp `lse`."""
    if warp_specialised(q.shape[2], v_dim, q.shape[-1] - v_dim):
        return _ws(q, kv, idx, scale, v_dim, lse, None, None)
    return _probs(q, kv, idx, lse, scale, v_dim, True, _config("probs", q.shape[2]))
