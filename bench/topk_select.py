"""The indexer top-k's selection step, in parts, on the same sort keys (GPU; `python -m bench --sections
topk_select`): the logits of one query block, each row's threshold by `triton_topk.threshold` (a radix select over
the visible keys) and by `torch.topk` (what it replaced), the position-ordered take, cuDNN's Hopper radix top-k
(`indexer_top_k_wrapper`, where the frontend is installed: fp32 logits, a visible length per row, ties to the
lower position), and the sort into logit order that follows."""

from __future__ import annotations

import torch
import triton

from train.ops import triton_topk


def topk_threshold(keys_BTS: torch.Tensor, k: int) -> torch.Tensor:
    """`torch.topk` over the whole row (what `triton_topk.threshold` replaced)."""
    return torch.topk(keys_BTS, k, dim=-1, sorted=False).values.min(dim=-1).values


def cudnn_topk(keys_BTS: torch.Tensor, k: int, t0: int) -> torch.Tensor:
    """cuDNN's radix top-k of each row's visible prefix: [T, k] int32 positions (-1 past a short row), from the fp32
    logits the sort keys encode."""
    from cudnn.deepseek_sparse_attention import indexer_top_k_wrapper

    B, T, S = keys_BTS.shape
    values = triton_topk.decode_keys(keys_BTS).reshape(B * T, S)
    lens = (t0 + 1 + torch.arange(T, device=keys_BTS.device, dtype=torch.int32)).clamp(max=S).repeat(B)
    return indexer_top_k_wrapper(values, lens, k, return_val=False, tie_break=1)["indices"]


def bench_topk_select(L: int, iters: int) -> list[dict]:
    """At the last (longest) query block of an L-token sequence, DeepSeek's indexer shape: the logits kernel, each
    threshold, the position-ordered take and the sort, each alone; the thresholds compared."""
    from bench.common import DI, TOPK, G, guarded

    dev = "cuda"
    rows = triton_topk.query_rows(L, TOPK)
    t0 = L - rows
    q = torch.randn(1, rows, G, DI, device=dev, dtype=torch.bfloat16)
    kk = torch.randn(1, L, DI, device=dev, dtype=torch.bfloat16)
    w = torch.randn(1, rows, G, device=dev) * (G * DI) ** -0.5
    keys = triton_topk.logit_keys(q, kk, w, t0)
    thr = topk_threshold(keys, TOPK)
    same = bool(torch.equal(triton_topk.threshold(keys, TOPK, t0), thr))
    top = triton_topk.top_keys(keys, TOPK, t0=t0)
    out = [guarded(f"select L={L}: logits (one block)", lambda: triton_topk.logit_keys(q, kk, w, t0), iters),
           guarded(f"select L={L}: threshold, torch.topk", lambda: topk_threshold(keys, TOPK), iters),
           guarded(f"select L={L}: threshold, radix", lambda: triton_topk.threshold(keys, TOPK, t0), iters),
           guarded(f"select L={L}: top_keys (threshold + take)", lambda: triton_topk.top_keys(keys, TOPK, t0=t0),
                   iters),
           guarded(f"select L={L}: sort into logit order", lambda: torch.sort(top, dim=-1, descending=True), iters)]
    out[2]["same_threshold_as_torch_topk"] = same
    try:
        pos = 4294967295 - (top & 0xFFFFFFFF)
        want = pos.masked_fill((top >> 32) == triton_topk.NEG_INF_KEY, -1)[0].sort(-1).values
        got = cudnn_topk(keys, TOPK, t0).long().sort(-1).values
        out.append(guarded(f"select L={L}: cuDNN radix top-k (positions)", lambda: cudnn_topk(keys, TOPK, t0),
                           iters))
        out[-1]["same_set_as_ours"] = bool(torch.equal(got, want))
    except ImportError as e:
        out.append({"name": f"select L={L}: cuDNN radix top-k", "error": f"not installed ({e})"})
    for r in out:
        r["blocks_in_sequence"] = triton.cdiv(L, rows)
    return out
