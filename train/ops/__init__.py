"""The one dispatch point for DSA's hot paths: model code calls these names, never a backend directly.

Today every op runs the chunked PyTorch reference (`reference.py`), on any device. GPU kernels
(issue 7) register here, next to their reference twin, and are chosen per call.
"""

from train.ops.reference import (
    dense_attention,
    dense_indexer_kl,
    indexer_logits,
    indexer_topk,
    sparse_indexer_kl,
    sparse_mla,
)

__all__ = [
    "dense_attention",
    "dense_indexer_kl",
    "indexer_logits",
    "indexer_topk",
    "sparse_indexer_kl",
    "sparse_mla",
]
