"""Sparse MLA in MQA (absorbed) form on Hopper GPUs (TileLang); twin: `reference.sparse_mla`.

One program serves one query token and a block of up to 64 heads (one warpgroup's `wgmma` rows); per block of
selected keys it gathers the latent rows [latent (DV) | rope key (DR)] into shared memory once for all its heads.
For 64-head blocks the kernels are warp-specialised (`_ws_kernel`, `_bwd_ws_kernel`, `_dq_kernel`): a producer
warpgroup gathers the rows with asynchronous copies into a ring of shared-memory slots under barriers while two
consumer warpgroups compute, each owning half of the value (or gradient) columns:
  forward          online softmax in base 2 (fp32): output and per-head log-sum-exp
  given lse        the checkpoint recomputation: output and the head-averaged probabilities in one pass
  backward         dS = P (dP - Delta) with Delta = rowsum(dO * O) computed first, and the latent rows'
                   gradients (dKV^T = Q^T dS + dO^T P, fp32 atomics); then dQ = dS · rows from dS (bf16), which
                   exists for one slice of queries at a time
Smaller head blocks (fewer than 64 heads) run kernels whose warpgroups share every role (`_fwd_kernel`,
`_probs_kernel`, `_bwd_kernel`); the probabilities alone (the forward's sparse indexer target) always do: a
warp-specialised version with one consumer ran no faster (97 against 98 ms at 64K tokens).

Contract (as the twin's): q [B, L, H, DV + DR], kv [B, L, DV + DR] in bf16, idx [B, L, K] with -1 for "none";
a query with no selection gets a zero output, lse +inf and zero gradients. Head counts that are not a multiple of
the head block are padded here (zero queries, +inf log-sum-exp), and K to a multiple of the key block (-1).
"""

from __future__ import annotations

import sys

import tilelang
import torch
from tilelang import language as T

from train.ops.autograd import sparse_mla_function

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Fast math: exp2 / log2 / division by the approximate hardware instructions (flushing denormals), as the
# softmax needs; copies and warp roles are written out in the kernels, not inferred.
PASS_CONFIGS = {tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: True,
                tilelang.PassConfigKey.TL_DISABLE_TMA_LOWER: True,
                tilelang.PassConfigKey.TL_DISABLE_WARP_SPECIALIZED: True}

# Launch configurations (keys per block, pipeline stages); threads follow the head block (`num_threads`).
CONFIGS = {"fwd": dict(block_k=64, num_stages=2), "probs": dict(block_k=64, num_stages=2),
           "bwd": dict(block_k=32, num_stages=0), "ws": dict(block_k=64, num_stages=2),
           "bwd_ws": dict(block_k=32, num_stages=2), "dq": dict(block_k=64, num_stages=2)}
# The warp-specialised backward's dS (bf16) is made for this many elements of it at a time (2**29: 1 GiB).
DS_CHUNK_ELEMS = 1 << 29


def head_block(H: int) -> int:
    """Heads per program: 64, or for fewer heads the next power of two >= 16 (the smallest GEMM tile)."""
    return 64 if H > 64 else max(16, 1 << (H - 1).bit_length())


def num_threads(H: int) -> int:
    """Two warpgroups for 64-head blocks; one for smaller ones, whose GEMM tiles cannot occupy eight warps
    (each warp needs 16 rows and 8 columns of every tile)."""
    return 256 if head_block(H) >= 64 else 128


@T.macro
def _online_softmax_step(acc_s, acc_o, m, m_prev, alpha, den, den_blk, c):
    """One key block of the online softmax (base 2, scores scaled by c): the running max m and denominator den
    take the block's scores acc_s [heads, keys], which become their probabilities; acc_o [heads, dims] is
    rescaled to the new max (alpha: the factor, for whoever holds the rest of the output)."""
    heads, keys = acc_s.shape
    T.copy(m, m_prev)
    T.reduce_max(acc_s, m, dim=1, clear=False)
    for h in T.Parallel(heads):
        m[h] = T.max(m[h], m_prev[h])
        alpha[h] = T.exp2((m_prev[h] - m[h]) * c)
    for h, j in T.Parallel(heads, keys):
        acc_s[h, j] = T.exp2(acc_s[h, j] * c - m[h] * c)
    T.reduce_sum(acc_s, den_blk, dim=1)
    for h in T.Parallel(heads):
        den[h] = den[h] * alpha[h] + den_blk[h]
    for h, d in T.Parallel(heads, acc_o.shape[1]):
        acc_o[h, d] = acc_o[h, d] * alpha[h]


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


# The warp-specialised kernel's roles: one producer and two consumer warpgroups.
WS_THREADS = 384


def warp_specialised(H: int, v_dim: int, rope_dim: int) -> bool:
    """Shapes the warp-specialised kernel takes: 64-head blocks, latent rows of whole 64-column chunks (the
    producer's copy pattern) and value halves of whole 64-column chunks (one per consumer)."""
    return head_block(H) == 64 and (v_dim + rope_dim) % 64 == 0 and v_dim % 128 == 0


@T.macro
def _gather_ring(KV, Idx, kv_s, full, free, b, t, p, rounds, num_stages, block_k, width, bias_s=None):
    """The producer warpgroup (thread p of 128): for each key block, wait for its ring slot to be free, gather the
    selected latent rows into it with asynchronous 16-byte copies (rows p // 8 + 16 i, columns 8 (p % 8) + 64 u),
    and have the slot's `full` barrier complete when they land. An unselected key (-1) reads nothing: its row is
    filled with zeros. With `bias_s` [slots, block_k] (fp32), each key's score bias lands beside its row: 0, or
    -inf for an unselected key, so that the consumers mask scores from shared memory, not from global loads of
    the selection in their critical path."""
    for r in T.serial(rounds):
        for s in T.unroll(num_stages):
            T.barrier_wait(free[s], (r & 1) ^ 1)
            _gather_rows(KV, Idx, kv_s, s, b, t, r * num_stages + s, p, block_k, width, bias_s)
            T.cp_async_barrier_noinc(full[s])


@T.macro
def _gather_rows(KV, Idx, kv_s, s, b, t, kb, p, block_k, width, bias_s=None):
    """Producer thread p's asynchronous copies of key block kb's selected rows into ring slot s (and, given
    `bias_s`, the rows' score biases)."""
    for i in T.unroll(block_k // 16):
        row = i * 16 + p // 8
        key = Idx[b, t, kb * block_k + row]
        if bias_s is not None:
            if p % 8 == 0:
                bias_s[s, row] = T.if_then_else(key >= 0, T.float32(0), -T.infinity(T.float32))
        for u in T.unroll(width // 64):
            col = u * 64 + (p % 8) * 8
            T.ptx_cp_async(T.access_ptr(kv_s[s, row, col], "w", 8),
                           T.access_ptr(KV[b, T.max(key, 0), col], "r", 8), 8, predicate=key >= 0)


@T.macro
def _score_gemm(q_s, kv_s, s, acc_s, dv):
    """acc_s += q_s · kv_s[s]^T over d_qk as three asynchronous tensor-core GEMMs (the two value halves, then the
    rope part), waited for together. The ring's rows were written by asynchronous copies, which the tensor cores
    read through the other proxy: fence first."""
    hv = dv // 2
    T.fence_proxy_async()
    T.wgmma_gemm(q_s[:, :hv], kv_s[s, :, :hv], acc_s, transpose_B=True)
    T.wgmma_gemm(q_s[:, hv:dv], kv_s[s, :, hv:dv], acc_s, transpose_B=True)
    T.wgmma_gemm(q_s[:, dv:], kv_s[s, :, dv:], acc_s, transpose_B=True)
    T.wait_wgmma(0)


@T.macro
def _store_through(acc, tile_s, out):
    """out = acc (bf16) by way of the shared-memory tile tile_s: each row goes to global memory in 16-byte pieces
    rather than as the accumulator's scattered 4-byte pairs."""
    T.copy(acc, tile_s)
    T.copy(tile_s, out)


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
def _bwd_ws_kernel(Q, KV, Idx, dO, Lse, Delta, dKV, heads, dv, dr, topk, scale, block_k, num_stages):
    """The backward's first half for one query token and 64 heads, in three warpgroups: dS (bf16, returned, for
    `_dq_kernel`) and the latent rows' gradients, added into dKV [B, S, D] (fp32, atomics).

    The producer fills the ring of selected latent rows as in `_ws_kernel`. Per key block, consumer 0 scores it
    (S, over d_qk) while consumer 1 takes dP = dO · V^T; consumer 0 forms P from the log-sum-exp and
    dS = P (dP - Delta) scale, with Delta = rowsum(dO * O) given, and shares P and dS through shared memory.
    Both then form the rows' gradients transposed, dKV^T = Q^T dS + dO^T P, each for its own columns (consumer
    0: the first half of the latent and the rope part; consumer 1: the second half), so that every tensor-core
    GEMM has 64 or more rows, and add them into dKV."""
    B, L, S = T.dynamic("B"), T.dynamic("L"), T.dynamic("S")  # S: latent rows (all L, or more)
    BH, BK, NS, D, HV = 64, block_k, num_stages, dv + dr, dv // 2
    NH, NR, c = heads // BH, topk // (block_k * num_stages), scale * LOG2E
    Q: T.Tensor([B, L, heads, D], T.bfloat16)  # noqa: F811
    KV: T.Tensor([B, S, D], T.bfloat16)  # noqa: F811
    Idx: T.Tensor([B, L, topk], T.int32)  # noqa: F811
    dO: T.Tensor([B, L, heads, dv], T.bfloat16)  # noqa: F811
    Lse: T.Tensor([B, L, heads], T.float32)  # noqa: F811
    Delta: T.Tensor([B, L, heads], T.float32)  # noqa: F811
    dKV: T.Tensor([B, S, D], T.float32)  # noqa: F811
    dS = T.empty([B, L, heads, topk], T.bfloat16)

    with T.Kernel(L * NH, B, threads=WS_THREADS) as (bx, b):
        t, h0 = bx // NH, (bx % NH) * BH
        q_s = T.alloc_shared([BH, D], T.bfloat16)
        do_s = T.alloc_shared([BH, dv], T.bfloat16)
        kv_s = T.alloc_shared([NS, BK, D], T.bfloat16)
        bias_s = T.alloc_shared([NS, BK], T.float32)
        p_s = T.alloc_shared([BH, BK], T.bfloat16)
        ds_s = T.alloc_shared([BH, BK], T.bfloat16)
        dp_s = T.alloc_shared([BH, BK], T.float32)
        acc_s = T.alloc_fragment([BH, BK], T.float32)
        acc_dp = T.alloc_fragment([BH, BK], T.float32)
        acc_a = T.alloc_fragment([HV, BK], T.float32)  # dKV^T, consumer 0: latent columns [0, dv/2)
        acc_r = T.alloc_fragment([dr, BK], T.float32)  # and the rope columns
        acc_b = T.alloc_fragment([HV, BK], T.float32)  # consumer 1: latent columns [dv/2, dv)
        lse2 = T.alloc_fragment([BH], T.float32)
        delta = T.alloc_fragment([BH], T.float32)
        q_ready = T.alloc_barrier(arrive_count=WS_THREADS)
        full = T.alloc_barrier(arrive_count=[128] * NS)
        free = T.alloc_barrier(arrive_count=[256] * NS)
        dp_full = T.alloc_barrier(arrive_count=128)  # consumer 1's dP is in dp_s
        pd_full = T.alloc_barrier(arrive_count=128)  # consumer 0's P and dS are in p_s, ds_s
        pd_free = T.alloc_barrier(arrive_count=256)  # both are done with p_s, ds_s
        tx = T.get_thread_binding()
        T.copy(Q[b, t, h0 : h0 + BH, :], q_s)
        T.copy(dO[b, t, h0 : h0 + BH, :], do_s)
        T.barrier_arrive(q_ready)
        if tx < 128:
            T.set_max_nreg(240, 1)
            T.copy(Lse[b, t, h0 : h0 + BH], lse2)
            T.copy(Delta[b, t, h0 : h0 + BH], delta)
            for h in T.Parallel(BH):
                lse2[h] = lse2[h] * LOG2E
            T.barrier_wait(q_ready, 0)
            for r in T.serial(NR):
                for s in T.unroll(NS):
                    kb = r * NS + s
                    T.barrier_wait(full[s], r & 1)
                    for h, j in T.Parallel(BH, BK):
                        acc_s[h, j] = bias_s[s, j]
                    T.gemm(q_s, kv_s[s, :, :], acc_s, transpose_B=True)
                    T.barrier_arrive(free[s])
                    for h, j in T.Parallel(BH, BK):
                        acc_s[h, j] = T.exp2(acc_s[h, j] * c - lse2[h])
                    T.barrier_wait(pd_free, (kb & 1) ^ 1)
                    T.copy(acc_s, p_s)
                    T.barrier_wait(dp_full, kb & 1)
                    for h, j in T.Parallel(BH, BK):
                        acc_s[h, j] = acc_s[h, j] * (dp_s[h, j] - delta[h]) * scale
                    T.copy(acc_s, ds_s)
                    T.copy(acc_s, dS[b, t, h0 : h0 + BH, kb * BK : (kb + 1) * BK])
                    T.fence_proxy_async()  # these writes before consumer 1's tensor-core reads
                    T.barrier_arrive(pd_full)
                    T.gemm(q_s[:, :HV], ds_s, acc_a, transpose_A=True, clear_accum=True)
                    T.gemm(do_s[:, :HV], p_s, acc_a, transpose_A=True)
                    T.gemm(q_s[:, dv:], ds_s, acc_r, transpose_A=True, clear_accum=True)
                    T.barrier_arrive(pd_free)
                    # an unselected key's gradient is exactly 0 (its probability is), so it may land in row 0
                    for d, j in T.Parallel(HV, BK):
                        T.atomic_add(dKV[b, T.max(Idx[b, t, kb * BK + j], 0), d], acc_a[d, j])
                    for d, j in T.Parallel(dr, BK):
                        T.atomic_add(dKV[b, T.max(Idx[b, t, kb * BK + j], 0), dv + d], acc_r[d, j])
        elif tx < 256:
            T.set_max_nreg(200, 1)
            T.barrier_wait(q_ready, 0)
            for r in T.serial(NR):
                for s in T.unroll(NS):
                    kb = r * NS + s
                    T.barrier_wait(full[s], r & 1)
                    T.gemm(do_s, kv_s[s, :, :dv], acc_dp, transpose_B=True, clear_accum=True)
                    T.barrier_arrive(free[s])
                    T.copy(acc_dp, dp_s)  # consumer 0 read the last one before its pd_full, awaited below
                    T.barrier_arrive(dp_full)
                    T.barrier_wait(pd_full, kb & 1)
                    T.fence_proxy_async()
                    T.gemm(q_s[:, HV:dv], ds_s, acc_b, transpose_A=True, clear_accum=True)
                    T.gemm(do_s[:, HV:], p_s, acc_b, transpose_A=True)
                    T.barrier_arrive(pd_free)
                    for d, j in T.Parallel(HV, BK):
                        T.atomic_add(dKV[b, T.max(Idx[b, t, kb * BK + j], 0), HV + d], acc_b[d, j])
        else:
            T.set_max_nreg(56, 0)
            _gather_ring(KV, Idx, kv_s, full, free, b, t, tx - 256, NR, NS, BK, D, bias_s)
    return dS


@tilelang.jit(pass_configs=PASS_CONFIGS)
def _dq_kernel(dS, KV, Idx, heads, dv, dr, topk, block_k, num_stages):
    """The backward's second half: dQ = dS · [latent | rope key] over the selected rows, for one query token and
    64 heads. The producer gathers each key block's rows and its dS tile into a ring slot; consumer 0
    accumulates the first half of the latent columns and the rope columns, consumer 1 the second half."""
    B, L, S = T.dynamic("B"), T.dynamic("L"), T.dynamic("S")  # S: latent rows (all L, or more)
    BH, BK, NS, D, HV = 64, block_k, num_stages, dv + dr, dv // 2
    NH, NR = heads // BH, topk // (block_k * num_stages)
    dS: T.Tensor([B, L, heads, topk], T.bfloat16)  # noqa: F811
    KV: T.Tensor([B, S, D], T.bfloat16)  # noqa: F811
    Idx: T.Tensor([B, L, topk], T.int32)  # noqa: F811
    dQ = T.empty([B, L, heads, D], T.bfloat16)

    with T.Kernel(L * NH, B, threads=WS_THREADS) as (bx, b):
        t, h0 = bx // NH, (bx % NH) * BH
        kv_s = T.alloc_shared([NS, BK, D], T.bfloat16)
        ds_s = T.alloc_shared([NS, BH, BK], T.bfloat16)
        acc_lo = T.alloc_fragment([BH, HV], T.float32)
        acc_r = T.alloc_fragment([BH, dr], T.float32)
        acc_hi = T.alloc_fragment([BH, HV], T.float32)
        full = T.alloc_barrier(arrive_count=[128] * NS)
        free = T.alloc_barrier(arrive_count=[256] * NS)
        tx = T.get_thread_binding()
        if tx < 128:
            T.set_max_nreg(240, 1)
            T.fill(acc_lo, 0)
            T.fill(acc_r, 0)
            for r in T.serial(NR):
                for s in T.unroll(NS):
                    T.barrier_wait(full[s], r & 1)
                    T.gemm(ds_s[s, :, :], kv_s[s, :, :HV], acc_lo)
                    T.gemm(ds_s[s, :, :], kv_s[s, :, dv:], acc_r)
                    T.barrier_arrive(free[s])
            T.copy(acc_lo, dQ[b, t, h0 : h0 + BH, :HV])
            T.copy(acc_r, dQ[b, t, h0 : h0 + BH, dv:])
        elif tx < 256:
            T.set_max_nreg(168, 1)
            T.fill(acc_hi, 0)
            for r in T.serial(NR):
                for s in T.unroll(NS):
                    T.barrier_wait(full[s], r & 1)
                    T.gemm(ds_s[s, :, :], kv_s[s, :, HV:dv], acc_hi)
                    T.barrier_arrive(free[s])
            T.copy(acc_hi, dQ[b, t, h0 : h0 + BH, HV:dv])
        else:
            T.set_max_nreg(80, 0)
            p = tx - 256
            for r in T.serial(NR):
                for s in T.unroll(NS):
                    kb = r * NS + s
                    T.barrier_wait(free[s], (r & 1) ^ 1)
                    for i in T.unroll(BH * BK // 1024):  # the dS tile: 16-byte pieces, BK / 8 to a head's row
                        e = i * 128 + p
                        h, col = e // (BK // 8), (e % (BK // 8)) * 8
                        T.ptx_cp_async(T.access_ptr(ds_s[s, h, col], "w", 8),
                                       T.access_ptr(dS[b, t, h0 + h, kb * BK + col], "r", 8), 8)
                    _gather_rows(KV, Idx, kv_s, s, b, t, kb, p, BK, D)
                    T.cp_async_barrier_noinc(full[s])
    return dQ


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


@tilelang.jit(pass_configs=PASS_CONFIGS)
def _bwd_kernel(Q, KV, Idx, dO, Lse, Delta, dKV, heads, dv, dr, topk, scale, block_k, num_stages, threads):
    """dQ (returned, bf16); dKV [B, L, DV + DR] fp32 (zeros in): += each selected row's gradient (atomics)."""
    B, L, S = T.dynamic("B"), T.dynamic("L"), T.dynamic("S")  # S: latent rows (all L, or more)
    BH = head_block(heads)
    NH, NK, c = heads // BH, topk // block_k, scale * LOG2E
    Q: T.Tensor([B, L, heads, dv + dr], T.bfloat16)  # noqa: F811
    KV: T.Tensor([B, S, dv + dr], T.bfloat16)  # noqa: F811
    Idx: T.Tensor([B, L, topk], T.int32)  # noqa: F811
    dO: T.Tensor([B, L, heads, dv], T.bfloat16)  # noqa: F811
    Lse: T.Tensor([B, L, heads], T.float32)  # noqa: F811
    Delta: T.Tensor([B, L, heads], T.float32)  # noqa: F811
    dKV: T.Tensor([B, S, dv + dr], T.float32)  # noqa: F811
    dQ = T.empty([B, L, heads, dv + dr], T.bfloat16)

    with T.Kernel(L * NH, B, threads=threads) as (bx, b):
        t, h0 = bx // NH, (bx % NH) * BH
        q_s = T.alloc_shared([BH, dv], T.bfloat16)
        qr_s = T.alloc_shared([BH, dr], T.bfloat16)
        do_s = T.alloc_shared([BH, dv], T.bfloat16)
        kv_s = T.alloc_shared([block_k, dv], T.bfloat16)
        kr_s = T.alloc_shared([block_k, dr], T.bfloat16)
        p_s = T.alloc_shared([BH, block_k], T.bfloat16)
        ds_s = T.alloc_shared([BH, block_k], T.bfloat16)
        valid = T.alloc_fragment([block_k], "bool")
        lse2 = T.alloc_fragment([BH], T.float32)
        delta = T.alloc_fragment([BH], T.float32)
        acc_p = T.alloc_fragment([BH, block_k], T.float32)
        acc_dp = T.alloc_fragment([BH, block_k], T.float32)
        acc_dq = T.alloc_fragment([BH, dv], T.float32)
        acc_dqr = T.alloc_fragment([BH, dr], T.float32)
        acc_dkv = T.alloc_fragment([block_k, dv], T.float32)
        acc_dkr = T.alloc_fragment([block_k, dr], T.float32)
        T.copy(Q[b, t, h0 : h0 + BH, :dv], q_s)
        T.copy(Q[b, t, h0 : h0 + BH, dv:], qr_s)
        T.copy(dO[b, t, h0 : h0 + BH, :], do_s)
        T.copy(Lse[b, t, h0 : h0 + BH], lse2)
        T.copy(Delta[b, t, h0 : h0 + BH], delta)
        for h in T.Parallel(BH):
            lse2[h] = lse2[h] * LOG2E
        T.clear(acc_dq)
        T.clear(acc_dqr)
        for kb in T.Pipelined(NK, num_stages=num_stages):
            for j in T.Parallel(block_k):
                valid[j] = Idx[b, t, kb * block_k + j] >= 0
            for j, d in T.Parallel(block_k, dv):
                kv_s[j, d] = KV[b, T.max(Idx[b, t, kb * block_k + j], 0), d]
            for j, d in T.Parallel(block_k, dr):
                kr_s[j, d] = KV[b, T.max(Idx[b, t, kb * block_k + j], 0), dv + d]
            for h, j in T.Parallel(BH, block_k):
                acc_p[h, j] = T.if_then_else(valid[j], 0, -T.infinity(acc_p.dtype))
            T.gemm(q_s, kv_s, acc_p, transpose_B=True, policy=T.GemmWarpPolicy.FullCol)
            T.gemm(qr_s, kr_s, acc_p, transpose_B=True, policy=T.GemmWarpPolicy.FullCol)
            for h, j in T.Parallel(BH, block_k):
                acc_p[h, j] = T.exp2(acc_p[h, j] * c - lse2[h])
            T.copy(acc_p, p_s)
            T.gemm(do_s, kv_s, acc_dp, transpose_B=True, policy=T.GemmWarpPolicy.FullCol, clear_accum=True)
            for h, j in T.Parallel(BH, block_k):
                acc_dp[h, j] = acc_p[h, j] * (acc_dp[h, j] - delta[h]) * scale
            T.copy(acc_dp, ds_s)
            T.gemm(ds_s, kv_s, acc_dq, policy=T.GemmWarpPolicy.FullCol)
            T.gemm(ds_s, kr_s, acc_dqr, policy=T.GemmWarpPolicy.FullCol)
            T.gemm(ds_s, q_s, acc_dkv, transpose_A=True, policy=T.GemmWarpPolicy.FullCol, clear_accum=True)
            T.gemm(p_s, do_s, acc_dkv, transpose_A=True, policy=T.GemmWarpPolicy.FullCol)
            T.gemm(ds_s, qr_s, acc_dkr, transpose_A=True, policy=T.GemmWarpPolicy.FullCol, clear_accum=True)
            # an invalid selection's gradient is exactly 0 (its probability is), so it may land in row 0
            for j, d in T.Parallel(block_k, dv):
                T.atomic_add(dKV[b, T.max(Idx[b, t, kb * block_k + j], 0), d], acc_dkv[j, d])
            for j, d in T.Parallel(block_k, dr):
                T.atomic_add(dKV[b, T.max(Idx[b, t, kb * block_k + j], 0), dv + d], acc_dkr[j, d])
        T.copy(acc_dq, dQ[b, t, h0 : h0 + BH, :dv])
        T.copy(acc_dqr, dQ[b, t, h0 : h0 + BH, dv:])
    return dQ


def _padded(q, idx, block_k: int, lse=None):
    """q with its heads padded to a multiple of the head block (zeros), idx as int32 padded to a multiple of
    block_k (-1), and lse padded like q's heads (+inf: the padding heads have no probability)."""
    H = q.shape[2]
    Hp = -(-H // head_block(H)) * head_block(H)
    K = idx.shape[-1]
    Kp = -(-K // block_k) * block_k
    if Hp != H:
        q = torch.nn.functional.pad(q, (0, 0, 0, Hp - H))
        lse = None if lse is None else torch.nn.functional.pad(lse, (0, Hp - H), value=float("inf"))
    idx = idx.to(torch.int32)
    if Kp != K:
        idx = torch.nn.functional.pad(idx, (0, Kp - K), value=-1)
    return q.contiguous(), idx.contiguous(), (None if lse is None else lse.contiguous()), H, K


def _config(kind: str, H: int, **chosen) -> dict:
    """CONFIGS' entry for `kind` with the caller's non-None choices on top, and the threads for H heads."""
    return {**CONFIGS[kind], "threads": num_threads(H), **{k: v for k, v in chosen.items() if v is not None}}


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


def sparse_mla_backward(q, kv, idx, out, lse, grad_out, scale: float, v_dim: int, block_k: int | None = None,
                        num_stages: int | None = None, threads: int | None = None, dkv_acc=None):
    """(dq like q, dkv like kv); given `dkv_acc` (fp32, like kv), the latent-row gradients are added into it and it
    is returned instead (a caller that runs the backward in query chunks sums them in fp32). Shapes the
    warp-specialised kernels take run them (launch configurations: CONFIGS' "bwd_ws" and "dq"); the others, or a
    caller that gives `threads`, run the one-kernel backward with `block_k`, `num_stages` and `threads`."""
    ws = warp_specialised(q.shape[2], v_dim, q.shape[-1] - v_dim) and threads is None
    cfg = _config("bwd", q.shape[2], block_k=block_k, num_stages=num_stages, threads=threads)
    ring = CONFIGS["bwd_ws"]["block_k"] * CONFIGS["bwd_ws"]["num_stages"]
    ring = max(ring, CONFIGS["dq"]["block_k"] * CONFIGS["dq"]["num_stages"]) if ws else cfg["block_k"]
    qp, idxp, lsep, H, _ = _padded(q, idx, ring, lse.float())
    B, L, Hp, D = qp.shape
    delta = torch.zeros(B, L, Hp, dtype=torch.float32, device=q.device)  # rowsum(dO * O), in slices
    for t0 in range(0, L, 4096):
        delta[:, t0 : t0 + 4096, :H] = (grad_out[:, t0 : t0 + 4096].float() * out[:, t0 : t0 + 4096].float()).sum(-1)
    do = torch.nn.functional.pad(grad_out, (0, 0, 0, Hp - H)) if Hp != H else grad_out
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device) if dkv_acc is None else dkv_acc
    if ws:
        dq = torch.empty_like(qp)
        K, kvc, step = idxp.shape[-1], kv.contiguous(), max(1, DS_CHUNK_ELEMS // (Hp * idxp.shape[-1]))
        for t0 in range(0, L, step):  # dS [B, step, Hp, K] (bf16) exists one slice of queries at a time
            rows = slice(t0, t0 + step)
            idx_c = idxp[:, rows].contiguous()
            ds = _bwd_ws_kernel(qp[:, rows].contiguous(), kvc, idx_c, do[:, rows].contiguous(),
                                lsep[:, rows].contiguous(), delta[:, rows].contiguous(), dkv, Hp, v_dim, D - v_dim, K,
                                scale, CONFIGS["bwd_ws"]["block_k"], CONFIGS["bwd_ws"]["num_stages"])
            dq[:, rows] = _dq_kernel(ds, kvc, idx_c, Hp, v_dim, D - v_dim, K, CONFIGS["dq"]["block_k"],
                                     CONFIGS["dq"]["num_stages"])
        return dq[:, :, :H], (dkv.to(kv.dtype) if dkv_acc is None else dkv)
    dq = _bwd_kernel(qp, kv.contiguous(), idxp, do.contiguous(), lsep, delta, dkv, Hp, v_dim, D - v_dim,
                     idxp.shape[-1], scale, cfg["block_k"], cfg["num_stages"], cfg["threads"])
    return dq[:, :, :H], (dkv.to(kv.dtype) if dkv_acc is None else dkv)


SparseMLA = sparse_mla_function(sys.modules[__name__])


def sparse_mla(q_BLHD, kv_BLD, idx_BLK, scale: float, v_dim: int, lse_BLH=None):
    """Same contract as `reference.sparse_mla`: (out [B, L, H, v_dim], p [B, L, K] fp32, lse [B, L, H] fp32);
    given `lse_BLH` (from a forward on the same inputs) the output and p come from one pass."""
    return SparseMLA.apply(q_BLHD, kv_BLD, idx_BLK, scale, v_dim, lse_BLH)
