"""Sparse MLA in MQA (absorbed) form on Hopper GPUs (TileLang); twin: `reference.sparse_mla`.

One program serves one query token and a block of up to 64 heads (one warpgroup's `wgmma` rows). Per block of
selected keys it gathers the latent rows [latent (DV) | rope key (DR)] into shared memory once for all its heads,
scores them with tensor-core GEMMs, and runs an online softmax in base 2 (fp32). The forward writes the output
and the per-head log-sum-exp; from the log-sum-exp a second kernel gives the head-averaged probabilities over
the selected set (the sparse indexer loss's target), and in the checkpoint recomputation also the output, in one
pass. The backward recomputes the probabilities from the log-sum-exp, with Delta = rowsum(dO * O) computed
first, and adds the latent-row gradients into an fp32 buffer with atomics.

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
PASS_CONFIGS = {tilelang.PassConfigKey.TL_DISABLE_TMA_LOWER: True,
                tilelang.PassConfigKey.TL_DISABLE_WARP_SPECIALIZED: True}

# Launch configurations (keys per block, pipeline stages); threads follow the head block (`num_threads`).
CONFIGS = {"fwd": dict(block_k=64, num_stages=2), "probs": dict(block_k=64, num_stages=2),
           "bwd": dict(block_k=32, num_stages=0)}


def head_block(H: int) -> int:
    """Heads per program: 64, or for fewer heads the next power of two >= 16 (the smallest GEMM tile)."""
    return 64 if H > 64 else max(16, 1 << (H - 1).bit_length())


def num_threads(H: int) -> int:
    """Two warpgroups for 64-head blocks; one for smaller ones, whose GEMM tiles cannot occupy eight warps
    (each warp needs 16 rows and 8 columns of every tile)."""
    return 256 if head_block(H) >= 64 else 128


def supported(v_dim: int, rope_dim: int) -> bool:
    """Head dims the tiles take: powers of two, the rope part at least 32 (four warps' columns)."""
    return all(d >= 32 and d & (d - 1) == 0 for d in (v_dim, rope_dim))


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
            T.copy(m, m_prev)
            T.reduce_max(acc_s, m, dim=1, clear=False)
            for h in T.Parallel(BH):
                m[h] = T.max(m[h], m_prev[h])
                alpha[h] = T.exp2((m_prev[h] - m[h]) * c)
            for h, j in T.Parallel(BH, block_k):
                acc_s[h, j] = T.exp2(acc_s[h, j] * c - m[h] * c)
            T.reduce_sum(acc_s, den_blk, dim=1)
            for h in T.Parallel(BH):
                den[h] = den[h] * alpha[h] + den_blk[h]
            for h, d in T.Parallel(BH, dv):
                acc_o[h, d] = acc_o[h, d] * alpha[h]
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


def sparse_mla_forward(q, kv, idx, scale: float, v_dim: int, block_k: int | None = None,
                       num_stages: int | None = None, threads: int | None = None):
    """(out [B, L, H, v_dim] bf16, lse [B, L, H] fp32 natural-log)."""
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
    return _probs(q, kv, idx, lse, scale, v_dim, True, _config("probs", q.shape[2]))


def sparse_mla_backward(q, kv, idx, out, lse, grad_out, scale: float, v_dim: int, block_k: int | None = None,
                        num_stages: int | None = None, threads: int | None = None, dkv_acc=None):
    """(dq like q, dkv like kv); given `dkv_acc` (fp32, like kv), the latent-row gradients are added into it and it
    is returned instead (a caller that runs the backward in query chunks sums them in fp32)."""
    cfg = _config("bwd", q.shape[2], block_k=block_k, num_stages=num_stages, threads=threads)
    qp, idxp, lsep, H, _ = _padded(q, idx, cfg["block_k"], lse.float())
    B, L, Hp, D = qp.shape
    delta = torch.zeros(B, L, Hp, dtype=torch.float32, device=q.device)  # rowsum(dO * O), in slices
    for t0 in range(0, L, 4096):
        delta[:, t0 : t0 + 4096, :H] = (grad_out[:, t0 : t0 + 4096].float() * out[:, t0 : t0 + 4096].float()).sum(-1)
    do = torch.nn.functional.pad(grad_out, (0, 0, 0, Hp - H)) if Hp != H else grad_out
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device) if dkv_acc is None else dkv_acc
    dq = _bwd_kernel(qp, kv.contiguous(), idxp, do.contiguous(), lsep, delta, dkv, Hp, v_dim, D - v_dim,
                     idxp.shape[-1], scale, cfg["block_k"], cfg["num_stages"], cfg["threads"])
    return dq[:, :, :H], (dkv.to(kv.dtype) if dkv_acc is None else dkv)


SparseMLA = sparse_mla_function(sys.modules[__name__])


def sparse_mla(q_BLHD, kv_BLD, idx_BLK, scale: float, v_dim: int, lse_BLH=None):
    """Same contract as `reference.sparse_mla`: (out [B, L, H, v_dim], p [B, L, K] fp32, lse [B, L, H] fp32);
    given `lse_BLH` (from a forward on the same inputs) the output and p come from one pass."""
    return SparseMLA.apply(q_BLHD, kv_BLD, idx_BLK, scale, v_dim, lse_BLH)
