"""The public TileLang kernels for DeepSeek-V3.2's sparse MLA (tile-ai/tilelang, examples/deepseek_v32: the
warp-specialised forward `sparse_mla_fwd_pipelined.py` and the backward `sparse_mla_bwd.py`), timed beside ours in
the same run: `python -m bench --sections sparse_mla --public-tilelang DIR`, DIR holding those files (a checkout's
examples/deepseek_v32). Nothing of theirs ships here; without the option these rows are left out.

Their contract differs from ours, adapted here:
- the latent rows carry a group axis ([B, L, 1, D]); their log-sum-exp is in base 2;
- a selection is invalid when it lies after its query (they have no -1), and their forward leaves an invalid
  key's shared-memory row unwritten, so a block holding one scores whatever the slot held before (NaN on a
  fresh GPU). Their forward and ours therefore run on a selection whose every entry is valid: random positions
  anywhere in the sequence, with the queries placed after all keys (their `q_start_index_s` = L). Their backward
  loads every row, and runs on the causal selection of the main rows, ours' -1 made t + 1 (after the query),
  from our forward's output and log-sum-exp."""

from __future__ import annotations

import importlib
import math
import sys
import time

import torch

from bench.common import DV, failed_row, guarded, rel_diff, sparse_mla_flops


def load(directory: str):
    if directory not in sys.path:
        sys.path.insert(0, directory)  # their modules import each other (utils) by plain name
    return importlib.import_module("sparse_mla_fwd_pipelined"), importlib.import_module("sparse_mla_bwd")


def _phase(what: str) -> None:
    """A progress line before each untimed first run, after the GPU finished the previous one (a first run
    compiles; a stall shows which kernel it is in)."""
    torch.cuda.synchronize()
    print(f"  [public-tilelang] {what} ({time.strftime('%H:%M:%S')})", flush=True)


def bench_public(directory: str, ours, q, kv, idx, scale: float, iters: int) -> list[dict]:
    """Rows: ours' and their forward on every-entry-valid selections; their backward on `idx` (ours' backward row
    on the same inputs is the main table's)."""
    try:
        fwd, bwd = load(directory)
    except Exception as e:  # noqa: BLE001 -- a checkout this TileLang cannot run: record it
        return [failed_row("sparse_mla public-tilelang", e)]
    B, L, heads, _ = q.shape
    K = idx.shape[-1]
    kv4 = kv[:, :, None, :].contiguous()
    anywhere = (torch.rand(B, L, K, device=q.device) * L).to(torch.int32)
    anywhere4 = anywhere[:, :, None, :].contiguous()
    flops = sparse_mla_flops(heads, B * L * K)
    rows = []
    try:
        _phase("their forward, every selection valid")
        theirs_out = fwd.sparse_mla_fwd_interface(q, kv4, anywhere4, L, 1, sm_scale=scale)[0]
        _phase("our forward, every selection valid")
        ours_out = ours.sparse_mla_forward(q, kv, anywhere, scale, DV)[0]
        diff = rel_diff(theirs_out, ours_out)
        del theirs_out, ours_out  # (two outputs: 34 GB at 128K tokens)
        print(f"  public-tilelang forward against ours, every selection valid: relative difference {diff:.3g}",
              flush=True)
        rows += [guarded("sparse_mla tilelang fwd, every selection valid",
                         lambda: ours.sparse_mla_forward(q, kv, anywhere, scale, DV), iters, flops),
                 {**guarded("sparse_mla public-tilelang fwd, every selection valid",
                            lambda: fwd.sparse_mla_fwd_interface(q, kv4, anywhere4, L, 1, sm_scale=scale), iters,
                            flops), "rel_diff_vs_ours": diff}]
    except Exception as e:  # noqa: BLE001
        rows.append(failed_row("sparse_mla public-tilelang fwd", e))
    out, lse = ours.sparse_mla_forward(q, kv, idx, scale, DV)
    g = torch.randn_like(out)
    later = torch.arange(L, device=idx.device)[None, :, None] + 1
    ind = torch.where(idx >= 0, idx, later).to(torch.int32)[:, :, None, :].contiguous()
    lse2 = (lse * math.log2(math.e)).contiguous()
    try:
        _phase("their backward")
        dq_theirs = bwd.sparse_mla_bwd(q, kv4, out, g, ind, lse2, sm_scale=scale)[0]
        _phase("our backward")
        dq_ours = ours.sparse_mla_backward(q, kv, idx, out, lse, g, scale, DV)[0]
        diff = rel_diff(dq_theirs, dq_ours)
        del dq_theirs, dq_ours
        print(f"  public-tilelang backward against ours: relative difference of dq {diff:.3g}", flush=True)
        selected = int((idx >= 0).sum())
        rows.append({**guarded("sparse_mla public-tilelang bwd",
                               lambda: bwd.sparse_mla_bwd(q, kv4, out, g, ind, lse2, sm_scale=scale), iters,
                               2.5 * sparse_mla_flops(heads, selected)), "rel_diff_vs_ours": diff})
    except Exception as e:  # noqa: BLE001
        rows.append(failed_row("sparse_mla public-tilelang bwd", e))
    return rows
