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

from train.ops.autograd import sparse_mla_function
from train.ops.tilelang_sparse_mla_bwd import sparse_mla_backward
from train.ops.tilelang_sparse_mla_common import warp_specialised
from train.ops.tilelang_sparse_mla_fwd import sparse_mla_forward, sparse_mla_forward_given_lse, sparse_mla_probs

__all__ = ["sparse_mla", "sparse_mla_backward", "sparse_mla_forward", "sparse_mla_forward_given_lse",
           "sparse_mla_probs", "warp_specialised"]

SparseMLA = sparse_mla_function(sys.modules[__name__])


def sparse_mla(q_BLHD, kv_BLD, idx_BLK, scale: float, v_dim: int, lse_BLH=None, probs: bool = True):
    """Same contract as `ops.sparse_mla`: (out [B, L, H, v_dim], p [B, L, K] fp32, lse [B, L, H] fp32);
    given `lse_BLH` (from a forward on the same inputs) the output and p come from one pass."""
    return SparseMLA.apply(q_BLHD, kv_BLD, idx_BLK, scale, v_dim, lse_BLH, probs)
