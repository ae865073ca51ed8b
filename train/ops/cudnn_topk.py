"""The indexer top-k's selection from NVIDIA's cuDNN frontend (its Hopper radix top-k, `indexer_top_k_wrapper`);
twin: the selection of `reference.indexer_topk` (`topk_stable`: descending logit, ties to the lower position). An
optional dependency (`pip install .[gpu]`), picked at the dispatch point (`train/ops/__init__.py`) where it runs:
CUDA tensors on a Hopper GPU with the frontend installed.

Triton's logits kernel (`triton_topk.logit_keys`, raw fp32) scores a block of queries against every key it may
see; cuDNN selects each row's k largest logits over the row's visible prefix, ties at the cut to the lower position
(`tie_break=1`), in no particular order, and -1 past a row with fewer than k visible keys. `triton_topk.order`
then puts them in the twin's order with a sort over the k selected. The selected set is the one `torch.topk`'s
threshold and the position-ordered take give (`triton_topk.top_keys`), found in one radix pass instead of two
scans of the row.
"""

from __future__ import annotations

import torch

from train.ops import common


def _top_k():
    """cuDNN's top-k (raises ImportError where the package or its CuTe DSL runtime is missing)."""
    from cudnn.deepseek_sparse_attention import indexer_top_k_wrapper

    return indexer_top_k_wrapper


def importable() -> bool:
    try:
        _top_k()
    except Exception:  # noqa: BLE001 -- not installed, or a build this machine cannot load
        return False
    return True


def fits(x: torch.Tensor) -> bool:
    """The tensors the kernel takes (the package aside): CUDA on a Hopper GPU."""
    return common.is_hopper(x.device)


def select(logits_BTS: torch.Tensor, k: int, t0: int) -> torch.Tensor:
    """[B, T, k] int32 positions of each row's k largest logits, in no order, -1 past a short row: row r of
    logits_BTS (fp32) sees keys 0..t0 + r (t0: the first row's position among the keys)."""
    B, T, S = logits_BTS.shape
    lens = (t0 + 1 + torch.arange(T, device=logits_BTS.device, dtype=torch.int32)).clamp_(max=S).repeat(B)
    got = _top_k()(logits_BTS.reshape(B * T, S), lens, k, return_val=False, tie_break=1)
    return got["indices"].view(B, T, k)
