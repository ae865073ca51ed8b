"""What TileLang's sparse MLA kernels share (train/ops/tilelang_sparse_mla.py is the backend; its forward and
backward kernels are in tilelang_sparse_mla_fwd.py and tilelang_sparse_mla_bwd.py): compile settings, launch
configurations, head blocks, the warp-specialised kernels' roles and the macros both passes use, and the padding of
heads and selections."""

from __future__ import annotations

import tilelang
import torch
from tilelang import language as T

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
