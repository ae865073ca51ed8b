"""Sparse MLA's backward from NVIDIA's cuDNN frontend (`nvidia-cudnn-frontend`, its Hopper kernel); twin: the
gradients of `reference.sparse_mla`. An optional dependency (`pip install .[gpu]`), picked at the dispatch point
(`train/ops/__init__.py`) where it runs: bf16 CUDA tensors on a Hopper GPU, DeepSeek's latent rows (d_qk 576 =
latent 512 + rope 64, d_v 512) and at least two heads. The forward, the probabilities and the checkpoint
recomputation stay with the kernels that run the forward (TileLang or Triton, with FlashMLA's forward where it
runs; `autograd.ComposedSparseMLA` puts them together); this backward only needs their output and natural-log
log-sum-exp.

cuDNN's contract, adapted here: one flat sequence (q [N, H, 576], latent rows [S, 576], out and its gradient
[N, H, 512], lse [N, H]), int32 selections indexing the flat rows (entries outside them, our -1, are skipped),
and an attention sink per head, which we do not have: -inf, whose probability is 0. Batches become one flat
sequence whose selections are shifted to their sequence's rows. It returns dq and the latent rows' gradient in
bf16 (it sums the latter in fp32 inside).
"""

from __future__ import annotations

import torch

from train.ops import common

D_QK, D_V = 576, 512
KEY_BLOCK = 64  # selections are padded (-1) to whole blocks of the kernel's keys


def _flat_backward():
    """cuDNN's flat backward (raises ImportError where the package or its CuTe DSL runtime is missing)."""
    from cudnn.deepseek_sparse_attention import sparse_attention_backward_wrapper

    return sparse_attention_backward_wrapper


def importable() -> bool:
    try:
        _flat_backward()
    except Exception:  # noqa: BLE001 -- not installed, or a build this machine cannot load
        return False
    return True


def fits(q: torch.Tensor, kv: torch.Tensor, v_dim: int) -> bool:
    """The shapes and tensors the kernel takes (the package aside): latent rows kv [B, S, 576] with v_dim 512;
    q [B, L, H, ...] gives the heads and the dtype (the absorbed path passes its query parts, not the 576-wide
    absorbed queries)."""
    return (q.is_cuda and q.dtype == kv.dtype == torch.bfloat16 and kv.shape[-1] == D_QK and v_dim == D_V
            and q.shape[2] >= 2 and common.is_hopper(q.device))


def sparse_mla_backward(q, kv, idx, out, lse, grad_out, scale: float, v_dim: int, dkv_acc=None):
    """(dq like q, dkv like kv) for q [B, L, H, 576], kv [B, S, 576], idx [B, L, K], out and grad_out
    [B, L, H, 512], lse [B, L, H] (natural log, +inf for a query with no selection); given `dkv_acc` (fp32,
    like kv), the latent rows' gradient is added into it and it is returned instead (a caller that runs the
    backward in query chunks sums them in fp32)."""
    B, L, H, D = q.shape
    S = kv.shape[1]
    sink = torch.full((H,), float("-inf"), dtype=torch.float32, device=q.device)
    grads = _flat_backward()(q.reshape(B * L, H, D).contiguous(), kv.reshape(B * S, D).contiguous(),
                             out.reshape(B * L, H, v_dim).contiguous(),
                             grad_out.reshape(B * L, H, v_dim).contiguous(),
                             lse.reshape(B * L, H).float().contiguous(), sink,
                             common.flat_selection(idx, S, KEY_BLOCK), softmax_scale=scale)
    dq, dkv = grads["dq"].view(B, L, H, D), grads["dkv"].view(B, S, D)
    if dkv_acc is None:
        return dq, dkv
    dkv_acc += dkv
    return dq, dkv_acc
