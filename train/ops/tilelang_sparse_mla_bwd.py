"""TileLang's sparse MLA backward kernels and their host code: the warp-specialised backward (dS and the latent
rows' gradients, then dQ from dS) and the one-kernel backward for smaller head blocks. Backend:
train/ops/tilelang_sparse_mla.py."""

from __future__ import annotations

import tilelang
import torch
from tilelang import language as T

from train.ops import common
from train.ops.common import LOG2E
from train.ops.tilelang_sparse_mla_common import (
    CONFIGS,
    DS_CHUNK_ELEMS,
    PASS_CONFIGS,
    WS_THREADS,
    _config,
    _gather_ring,
    _gather_rows,
    _padded,
    head_block,
    warp_specialised,
)

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
    delta = torch.zeros(B, L, Hp, dtype=torch.float32, device=q.device)  # the padding heads' stay 0
    common.row_dot(grad_out, out, delta[:, :, :H])
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
