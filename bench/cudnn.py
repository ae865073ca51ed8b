"""NVIDIA cuDNN frontend's DeepSeek-sparse-attention backward (`nvidia-cudnn-frontend`, its Hopper CuTe-DSL kernel),
called directly and timed beside ours on the same inputs: `python -m bench --sections sparse_mla --cudnn`; and its
sparse attention score recomputation (`sparse_attn_score_recompute_wrapper`: the head-summed probabilities over the
selected set, L1-normalised, which is the sparse indexer KL's target) beside our probabilities pass, which the
training path does not take from cuDNN (not measured yet). The
training path calls the same kernel through `train/ops/cudnn_sparse_mla.py` (an optional dependency, the `gpu`
extra); this row times the kernel alone, as `bench/public.py` does for the public TileLang kernels. Where the
package does not import, one error row says why.

The inputs are adapted to its flat contract as `train/ops/cudnn_sparse_mla.py` describes (one sequence here, so
no shifted selections)."""

from __future__ import annotations

import math

import torch

from bench.common import DV, failed_row, guarded, rel_diff, sparse_mla_flops
from train.ops import cudnn_sparse_mla


def bench_cudnn(ours, q, kv, idx, scale: float, iters: int) -> list[dict]:
    """Rows: cuDNN's backward of our forward's output (ours' backward row on the same inputs is the main table's),
    with the relative differences of dq and the latent rows' gradient from ours."""
    try:
        backward = cudnn_sparse_mla._flat_backward()
    except Exception as e:  # noqa: BLE001 -- not installed, or a build this machine cannot load: record it
        return [failed_row("sparse_mla cudnn bwd", e)]
    B, L, heads, _ = q.shape
    assert B == 1, "the flat cuDNN layout is one sequence"
    out, lse = ours.sparse_mla_forward(q, kv, idx, scale, DV)
    g = torch.randn_like(out)
    sink = torch.full((heads,), -math.inf, device=q.device, dtype=torch.float32)
    idx32 = idx[0].to(torch.int32).contiguous()

    def run():
        r = backward(q[0], kv[0], out[0], g[0], lse[0].contiguous(), sink, idx32, softmax_scale=scale)
        return r["dq"], r["dkv"]
    rows = []
    try:
        print("  [cudnn] their backward (compiles on first use)", flush=True)
        dq_theirs, dkv_theirs = run()
        torch.cuda.synchronize()
        print("  [cudnn] our backward", flush=True)
        dq_ours, dkv_ours = ours.sparse_mla_backward(q, kv, idx, out, lse, g, scale, DV)
        diff = {"rel_diff_dq_vs_ours": rel_diff(dq_theirs[None], dq_ours),
                "rel_diff_dkv_vs_ours": rel_diff(dkv_theirs[None], dkv_ours)}
        del dq_theirs, dkv_theirs, dq_ours, dkv_ours
        print(f"  cudnn backward against ours: relative difference {diff}", flush=True)
        selected = int((idx >= 0).sum())
        rows.append({**guarded("sparse_mla cudnn bwd", run, iters, 2.5 * sparse_mla_flops(heads, selected)), **diff})
    except Exception as e:  # noqa: BLE001
        rows.append(failed_row("sparse_mla cudnn bwd", e))
    rows.append(bench_cudnn_probs(ours, q, kv, idx, lse, scale, iters))
    return rows


def bench_cudnn_probs(ours, q, kv, idx, lse, scale: float, iters: int) -> dict:
    """cuDNN's sparse attention score recomputation: P = exp(q·k · scale - lse) per head, summed over heads and
    L1-normalised over the selection (our p: the head average, which is the same where each head's probabilities
    over the selection sum to one); a query with no selection, whose lse is +inf, gives 0 / 0 there (set to 0 here,
    as ours gives it). Row: its time, TFLOP/s over the score GEMM's FLOPs, and the difference from ours."""
    name = "sparse_mla cudnn probs (score recompute)"
    try:
        from cudnn.deepseek_sparse_attention import sparse_attn_score_recompute_wrapper
    except Exception as e:  # noqa: BLE001
        return failed_row(name, e)
    idx32 = idx.to(torch.int32).contiguous()

    def run():
        p = sparse_attn_score_recompute_wrapper(q, kv, lse.contiguous(), idx32, scale)["target"]
        return p.nan_to_num_(0.0)
    try:
        print("  [cudnn] their score recomputation (compiles on first use)", flush=True)
        diff = {"rel_diff_p_vs_ours": rel_diff(run(), ours.sparse_mla_probs(q, kv, idx, lse, scale, DV))}
        selected = int((idx >= 0).sum())
        flops = sparse_mla_flops(q.shape[2], selected) * q.shape[-1] / (q.shape[-1] + DV)
        return {**guarded(name, run, iters, flops), **diff}
    except Exception as e:  # noqa: BLE001
        return failed_row(name, e)
