"""The fastest a sparse step of the 1B model could be, next to its dense step measured in the same run.

The dense step = its attention (SDPA at the model's shape, timed here: forward + backward + the checkpoint
recomputation's forward, times the layers) + the rest. The sparse step keeps the rest and swaps the attention
for sparse MLA: at least 2 forwards (the step's and the recomputation's) and a backward (2.5x the forward's
FLOPs), at two pairs of kernel rates (RATES) and at the GPU's measured matmul rate. The indexer (logits,
top-k, its loss) is left out, so every bound here is generous."""

from __future__ import annotations

import torch

from bench.common import TOPK, matmul_tflops, sparse_mla_flops
from bench.e2e import ONE_B
from bench.kernels import bench_sdpa

# Sparse MLA rates (TFLOP/s, forward / backward) the bound is taken at: a target and a goal.
RATES = {"targets": (350, 150), "goals": (450, 250)}


def sparse_bound(L: int, dense_ms: float, attention_ms: float, peak: float, layers: int, heads: int,
                 k: int = TOPK) -> dict:
    """Per rate pair: the sparse attention's time per step, the best speedup over the dense step, and how short
    the rest of the step would have to be for 3x (negative: no length is short enough)."""
    rest = dense_ms - attention_ms
    selected = k * L - k * (k - 1) // 2 if L >= k else L * (L + 1) // 2  # sum over t of min(t + 1, k)
    fwd_tflop = sparse_mla_flops(heads, selected) / 1e12
    row = {"name": f"bound L={L}", "L": L, "dense_step_ms": dense_ms, "dense_attention_ms": attention_ms,
           "rest_ms": rest, "matmul_tflops": peak, "rates": []}
    for what, (f, b) in [*RATES.items(), ("matmul peak", (peak, peak))]:
        sparse_attention = layers * (2 * fwd_tflop / f + 2.5 * fwd_tflop / b) * 1e3
        row["rates"].append({"rates": what, "fwd_tflops": f, "bwd_tflops": b, "sparse_attention_ms": sparse_attention,
                             "max_speedup": dense_ms / (rest + sparse_attention),
                             "rest_ms_for_3x": (attention_ms - 3 * sparse_attention) / 2})
    return row


def bench_bound(e2e: list[dict], iters: int) -> list[dict]:
    layers, heads = ONE_B["num_hidden_layers"], ONE_B["num_attention_heads"]
    peak = matmul_tflops(iters)
    print(f"  bf16 matmul 8192^3: {peak:.0f} TFLOP/s", flush=True)
    rows = []
    for dense in (r for r in e2e if r.get("name", "").startswith("e2e dense step") and "ms" in r
                  and r.get("model", "1b") == "1b"):
        L = dense["L"]
        sdpa = [r.get("ms") for r in bench_sdpa(L, iters, heads, label=f" ({heads} heads)")]  # fwd, fwd+bwd
        if None in sdpa:
            rows.append({"name": f"bound L={L}", "L": L, "error": "SDPA at the model's shape did not run"})
            continue
        rows.append({**sparse_bound(L, dense["ms"], layers * (sdpa[0] + sdpa[1]), peak, layers, heads),
                     "sdpa_fwd_ms": sdpa[0], "sdpa_fwd_bwd_ms": sdpa[1]})
        print(f"  {rows[-1]}", flush=True)
    return rows


def bound_table(rows: list[dict]) -> str:
    lines = ["| L | dense step | its attention | the rest | sparse rates (fwd / bwd TFLOP/s) | sparse attention | "
             "sparse step at best | speedup at best | the rest would have to take, for 3x |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for r in row.get("rates", []):
            need = f"{r['rest_ms_for_3x']:,.0f} ms" if r["rest_ms_for_3x"] > 0 else "less than nothing"
            lines.append(f"| {row['L']:,} | {row['dense_step_ms']:,.0f} ms | {row['dense_attention_ms']:,.0f} ms | "
                         f"{row['rest_ms']:,.0f} ms | {r['rates']} ({r['fwd_tflops']:.0f} / {r['bwd_tflops']:.0f}) | "
                         f"{r['sparse_attention_ms']:,.0f} ms | {row['rest_ms'] + r['sparse_attention_ms']:,.0f} ms | "
                         f"{r['max_speedup']:.2f}x | {need} |")
    return "\n".join(lines)
