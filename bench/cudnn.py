"""NVIDIA cuDNN frontend's DeepSeek-sparse-attention backward (`nvidia-cudnn-frontend`, its Hopper CuTe-DSL kernel),
called directly and timed beside ours on the same inputs: `python -m bench --sections sparse_mla --cudnn`. The
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
    return rows
