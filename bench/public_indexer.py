"""The public TileLang kernels for DeepSeek-V3.2's FP8 lightning indexer (tile-ai/tilelang, examples/deepseek_v32:
the logits kernel `fp8_lighting_indexer.py` and the radix top-k `topk_selector.py`), timed beside ours in the same
run: `python -m bench --sections topk --public-indexer DIR`, DIR holding those files (a checkout's
examples/deepseek_v32). Nothing of theirs ships here; without the option these rows are left out.

Their contract, adapted here: one sequence; e4m3 queries [T, G, D] with each head's scale folded into its weight
[T, G], e4m3 keys [S, D] with a scale per key; the visible keys of query t are [ks_t, ke_t) (causal: [0, t + 1));
their logits kernel writes fp32 logits [T, S], which their top-k reads (rows of fewer than k keys made it fault:
those rows score their first k keys here). The inputs are ours, quantised as our FP8
indexer quantises them (`reference.fp8_indexer_keys` / `fp8_indexer_queries`, inside the timed loop for both),
and both run in blocks of the same query rows (`triton_topk.query_rows`), so that neither holds [L, L] logits."""

from __future__ import annotations

import importlib
import sys

import torch

from bench.common import failed_row, guarded


def load(directory: str):
    if directory not in sys.path:
        sys.path.insert(0, directory)  # their modules import each other (utils) by plain name
    return importlib.import_module("fp8_lighting_indexer"), importlib.import_module("topk_selector")


def public_indexer_topk(logits_mod, topk_mod, q_BLGD, k_BSD, w_BLG, topk: int) -> torch.Tensor:
    """[L, topk] int32 selections of their kernels on our FP8 inputs (batch 1), in blocks of our query rows."""
    from train.ops import reference, triton_topk

    L = q_BLGD.shape[1]
    rows = triton_topk.query_rows(L, topk)
    k8, ks = reference.fp8_indexer_keys(k_BSD)
    out = torch.empty(L, topk, dtype=torch.int32, device=q_BLGD.device)
    for t0 in range(0, L, rows):
        t1 = min(L, t0 + rows)
        q8, w8 = reference.fp8_indexer_queries(q_BLGD[:, t0:t1], w_BLG[:, t0:t1])
        # causal ends, at least topk: their top-k takes rows of at least topk keys (the first topk rows then also
        # score keys past themselves; those rows are left out of the comparison)
        ends = torch.arange(t0 + 1, t1 + 1, dtype=torch.int32, device=q8.device).clamp(min=topk)
        starts = torch.zeros_like(ends)
        logits = logits_mod.mqa_attn_return_logits_interface(q8[0].contiguous(), k8[0, :t1].contiguous(),
                                                             ks[0, :t1].contiguous(), w8[0].contiguous(), starts, ends)
        out[t0:t1] = topk_mod.tl_topk(logits, starts, ends, topk)
    return out


def bench_public_indexer(directory: str, q_BLGD, k_BSD, w_BLG, topk: int, iters: int, flops: float) -> list[dict]:
    """Their FP8 logits + top-k, timed; and the share of our FP8 top-k's selections (rows past the first `topk`,
    where every row selects exactly `topk`) that theirs holds."""
    from train.ops import triton_topk

    name = "indexer_topk public tilelang fp8 (logits + topk_selector)"
    try:  # a fault in their kernels surfaces at the first read of their output: inside, to give one error row
        logits_mod, topk_mod = load(directory)
        theirs = public_indexer_topk(logits_mod, topk_mod, q_BLGD, k_BSD, w_BLG, topk)
        ours = triton_topk.indexer_topk(q_BLGD, k_BSD, w_BLG, topk, fp8=True)[0]
        L = q_BLGD.shape[1]
        sample = torch.arange(topk, L, max(1, (L - topk) // 64), device=ours.device)  # 64 full rows
        a, b = theirs[sample].long().sort(-1).values, ours[sample].sort(-1).values
        agree = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)) / b.numel()
        del theirs, ours
    except Exception as e:  # noqa: BLE001 -- their kernels fail to build or run here: one error row
        return [failed_row(name, e)]
    row = guarded(name, lambda: public_indexer_topk(logits_mod, topk_mod, q_BLGD, k_BSD, w_BLG, topk), iters, flops)
    return [{**row, "selection_agreement_with_ours": agree}]
