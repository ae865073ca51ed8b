"""What the kernel files share: the base-2 softmax's constants, the Hopper check, the backward's Delta, and the flat
selections of the vendor kernels."""

from __future__ import annotations

import torch

LOG2E = 1.4426950408889634  # log2(e): the kernels' online softmaxes run in base 2 (exp2, log2)
LN2 = 0.6931471805599453    # ln(2) = 1 / LOG2E
DELTA_SLICE = 4096          # tokens of rowsum(dO * O) taken at a time: no fp32 copy of a whole output


def is_hopper(device: torch.device) -> bool:
    """A CUDA device of compute capability 9 (H100, H200): where the TileLang and cuDNN kernels run."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def row_dot(grad_out_BLHV: torch.Tensor, out_BLHV: torch.Tensor, delta_BLH: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(dO * O) per query and head, in fp32, DELTA_SLICE tokens at a time (written into `delta_BLH`,
    which is returned; it may be a view of a wider, padded buffer)."""
    for t0 in range(0, out_BLHV.shape[1], DELTA_SLICE):
        t = slice(t0, t0 + DELTA_SLICE)
        delta_BLH[:, t] = (grad_out_BLHV[:, t].float() * out_BLHV[:, t].float()).sum(-1)
    return delta_BLH


def flat_selection(idx: torch.Tensor, rows_per_sequence: int, block: int) -> torch.Tensor:
    """idx [B, L, K] (-1: none) as int32 [B * L, K'] indexing the B sequences' rows laid end to end, K' = K padded
    with -1 to whole blocks of `block` keys: the selections of the vendor kernels that take one flat sequence
    (cuDNN's sparse MLA backward, FlashMLA's sparse forward)."""
    B, L, K = idx.shape
    pad = -K % block
    if B == 1 and pad == 0 and idx.dtype == torch.int32:  # already flat (top-2048 of one sequence): no copy
        return idx.reshape(L, K)
    flat = torch.full((B, L, K + pad), -1, dtype=torch.int32, device=idx.device)
    flat[..., :K] = idx
    if B > 1:
        offset = torch.arange(B, device=idx.device, dtype=torch.int32).view(B, 1, 1) * rows_per_sequence
        flat.add_(torch.where(flat >= 0, offset, 0))
    return flat.view(B * L, K + pad)
