"""The public TileLang kernels for DeepSeek-V3.2's sparse MLA (tile-ai/tilelang, examples/deepseek_v32: the
warp-specialised forward `sparse_mla_fwd_pipelined.py` and the backward `sparse_mla_bwd.py`), timed on the same
inputs as ours in the same run: `python -m bench --public-tilelang DIR`, DIR holding those files (a checkout's
examples/deepseek_v32). Nothing of theirs ships here; without the option these rows are left out.

Their contract differs from ours in two ways, adapted here: the latent rows carry a group axis ([B, L, 1, D]),
and a selection is invalid when it lies after its query (they have no -1), so ours' -1 become t + 1."""

from __future__ import annotations

import importlib
import sys

import torch

from bench.common import guarded


def load(directory: str):
    if directory not in sys.path:
        sys.path.insert(0, directory)  # their modules import each other (utils) by plain name
    return importlib.import_module("sparse_mla_fwd_pipelined"), importlib.import_module("sparse_mla_bwd")


def bench_public(directory: str, q, kv, idx, scale: float, fwd_flops: float, iters: int, ours_out) -> list[dict]:
    try:
        fwd, bwd = load(directory)
    except Exception as e:  # noqa: BLE001 -- a checkout this TileLang cannot run: record it
        return [{"name": "sparse_mla public-tilelang", "error": f"{type(e).__name__}: {str(e)[:200]}"}]
    L = q.shape[1]
    later = torch.arange(L, device=idx.device)[None, :, None] + 1
    ind = torch.where(idx >= 0, idx, later).to(torch.int32)[:, :, None, :].contiguous()
    kv4 = kv[:, :, None, :].contiguous()

    def forward():
        return fwd.sparse_mla_fwd_interface(q, kv4, ind, 0, 1, sm_scale=scale)
    try:
        out, lse = forward()
    except Exception as e:  # noqa: BLE001
        return [{"name": "sparse_mla public-tilelang fwd", "error": f"{type(e).__name__}: {str(e)[:200]}"}]
    diff = (out.float() - ours_out.float()).abs().max().item()  # same inputs, same math: a sanity check
    print(f"  public-tilelang forward against ours: max |out difference| {diff:.3g}", flush=True)
    g = torch.randn_like(out)
    return [{**guarded("sparse_mla public-tilelang fwd", forward, iters, fwd_flops), "max_diff_vs_ours": diff},
            guarded("sparse_mla public-tilelang bwd", lambda: bwd.sparse_mla_bwd(q, kv4, out, g, ind, lse,
                                                                                 sm_scale=scale), iters, 2.5 * fwd_flops)]

