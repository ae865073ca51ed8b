"""The one dispatch point for DSA's hot paths: model code calls these names, never a backend directly.

Each op has a chunked PyTorch reference (`reference.py`, any device: the oracle) and, where written, a
Triton kernel with the same contract (`triton_*.py`). `DSA_KERNELS` picks the backend:
  auto (default)  Triton for CUDA tensors whose shapes the kernel supports, else the reference
  reference       always the reference
  triton          Triton wherever the shapes allow, CPU tensors included (tests: TRITON_INTERPRET=1)
The warm-up KL (`dense_indexer_kl`) and the sparse indexer KL run the reference on every device for now.
"""

from __future__ import annotations

import os

import torch

from train.ops import reference
from train.ops.reference import dense_attention, dense_indexer_kl, indexer_logits, sparse_indexer_kl

try:
    from train.ops import triton_sparse_mla, triton_topk
except ImportError:  # no triton: the reference serves every op
    triton_sparse_mla = triton_topk = None

BACKENDS = ("auto", "reference", "triton")


def backend() -> str:
    name = os.environ.get("DSA_KERNELS", "auto")
    if name not in BACKENDS:
        raise ValueError(f"DSA_KERNELS={name!r}; allowed: {', '.join(BACKENDS)}")
    if name == "triton" and triton_topk is None:
        raise ValueError("DSA_KERNELS=triton, but triton is not installed; pip install triton")
    return name


def _pow2(*dims: int) -> bool:
    return all(d >= 16 and d & (d - 1) == 0 for d in dims)


def _use_triton(x: torch.Tensor, supported: bool) -> bool:
    name = backend()
    if name == "reference" or triton_topk is None or not supported:
        return False
    return name == "triton" or x.is_cuda


def indexer_topk(q_BLGD: torch.Tensor, k_BLD: torch.Tensor, w_BLG: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-k key positions per query (see `reference.indexer_topk`)."""
    if _use_triton(q_BLGD, _pow2(q_BLGD.shape[-1])):
        return triton_topk.indexer_topk(q_BLGD, k_BLD, w_BLG, topk)
    return reference.indexer_topk(q_BLGD, k_BLD, w_BLG, topk)


def sparse_mla(q_BLHD: torch.Tensor, kv_BLD: torch.Tensor, idx_BLK: torch.Tensor, scale: float, v_dim: int):
    """Sparse MLA in absorbed form (see `reference.sparse_mla`)."""
    D = q_BLHD.shape[-1]
    if _use_triton(q_BLHD, _pow2(v_dim, D - v_dim) and q_BLHD.dtype == kv_BLD.dtype):
        return triton_sparse_mla.sparse_mla(q_BLHD, kv_BLD, idx_BLK, scale, v_dim)
    return reference.sparse_mla(q_BLHD, kv_BLD, idx_BLK, scale, v_dim)


__all__ = [
    "backend",
    "dense_attention",
    "dense_indexer_kl",
    "indexer_logits",
    "indexer_topk",
    "sparse_indexer_kl",
    "sparse_mla",
]
