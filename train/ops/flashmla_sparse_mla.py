"""Sparse MLA's forward from FlashMLA (its SM90 sparse prefill kernel, `flash_mla_sparse_fwd` among the legacy
kernels of the `sgl-flash-mla` wheel); twin: the forward of `reference.sparse_mla`. An optional dependency,
picked at the dispatch point (`train/ops/__init__.py`) where it runs: bf16 CUDA tensors on a Hopper GPU,
DeepSeek's latent rows (d_qk 576 = latent 512 + rope 64, d_v 512) and 64 or 128 heads. The probabilities, the
checkpoint recomputation (output and probabilities in one pass) and the backward stay with the other kernels
(`autograd.ComposedSparseMLA` puts them together): FlashMLA gives the output and the log-sum-exp only.

Install it beside `.[gpu]` with `pip install --no-deps sgl-flash-mla==1.0.0`: the wheel declares torch >= 2.14.1,
but it is built on PyTorch's stable ABI and loads on older torch (2.11 measured).

FlashMLA's contract, adapted here: one flat sequence (q [N, H, 576], latent rows [S, 1, 576]), int32 selections
[N, 1, K] indexing the flat rows, K a multiple of 128 (our -1 pads it; it skips -1), output [N, H, 512] and a
natural-log log-sum-exp [N, H]. A query with no selection gets a zero output; its log-sum-exp is made +inf, as
the other kernels give it.
"""

from __future__ import annotations

import torch

from train.ops import common

D_QK, D_V = 576, 512
HEADS = (64, 128)  # the SM90 kernel's head blocks
KEY_BLOCK = 128  # the SM90 kernel takes selections in pairs of its 64-key blocks


def _sparse_fwd():
    """FlashMLA's sparse prefill forward (raises ImportError where the package is missing)."""
    from flash_mla import flash_mla_sparse_fwd

    return flash_mla_sparse_fwd


def importable() -> bool:
    try:
        import flash_mla

        return bool(flash_mla.has_legacy())
    except Exception:  # noqa: BLE001 -- not installed, or a build this machine cannot load
        return False


def fits(q: torch.Tensor, kv: torch.Tensor, v_dim: int) -> bool:
    """The shapes and tensors the kernel takes (the package aside): latent rows kv [B, S, 576] with v_dim 512; q
    [B, L, H, ...] gives the heads and the dtype."""
    return (q.is_cuda and q.dtype == kv.dtype == torch.bfloat16 and kv.shape[-1] == D_QK and v_dim == D_V
            and q.shape[2] in HEADS and common.is_hopper(q.device))


def sparse_mla_forward(q, kv, idx, scale: float, v_dim: int):
    """(out [B, L, H, 512] bf16, lse [B, L, H] fp32, natural log) for q [B, L, H, 576], kv [B, S, 576], idx
    [B, L, K]: the contract of the other kernels' `sparse_mla_forward`."""
    B, L, H, D = q.shape
    S = kv.shape[1]
    sel = common.flat_selection(idx, S, KEY_BLOCK)
    out, _, lse = _sparse_fwd()(q.reshape(B * L, H, D), kv.reshape(B * S, 1, D), sel.unsqueeze(1), scale,
                                d_v=v_dim, use_legacy=True)
    lse = lse.float().reshape(B, L, H)
    lse.masked_fill_(torch.isneginf(lse), float("inf"))  # no selection: +inf, as the other kernels give it
    return out.reshape(B, L, H, v_dim), lse
