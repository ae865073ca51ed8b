"""The benchmark's report functions (the measurements themselves need a GPU: `make bench`)."""

import pytest
import torch

from bench.common import window_selection
from bench.report import sweep_summary, table


def test_sweep_summary_picks_the_fastest_and_counts_failures():
    rows = [
        {"name": "sparse_mla fwd {'BK': 64}", "config": {"BK": 64}, "ms": 52.3},
        {"name": "sparse_mla fwd {'BK': 128}", "config": {"BK": 128}, "ms": 37.6},
        {"name": "sparse_mla fwd {'BK': 256}", "config": {"BK": 256}, "error": "OutOfResources: shared memory"},
        {"name": "sparse_mla bwd {'BK': 64}", "config": {"BK": 64}, "error": "OutOfResources: shared memory"},
    ]
    lines = sweep_summary(rows).splitlines()
    assert lines[2] == "| sparse_mla bwd | - | - | 1 |"
    assert lines[3] == "| sparse_mla fwd | {'BK': 128} | 37.60 | 1 |"


def test_table_reports_errors_and_end_to_end_rows():
    results = {
        "kernels": [{"L": 8192, "name": "sparse_mla fwd", "ms": 19.1, "tflops": 215.4, "peak_gib": 0.5},
                    {"L": 131072, "name": "indexer_topk plain pytorch", "error": "out of memory"}],
        "e2e": [{"L": 65536, "name": "e2e dense step L=65536", "ms": 4762.0, "tokens_per_sec": 13762.0,
                 "total_peak_gib": 18.85, "peak_gib": 6.2}, {"name": "parameters", "total": 1083000000}],
    }
    text = table(results)
    assert "| 8,192 | sparse_mla fwd | 19.10 | 215 | 0.50 |" in text
    assert "| 131,072 | indexer_topk plain pytorch | out of memory | | |" in text
    assert "| 1b | 65,536 | e2e dense step L=65536 | 4762 | 13,762 | 18.9 | 6.2 |" in text


def test_window_selection_takes_the_last_k_positions():
    assert window_selection(4, 3, "cpu").tolist() == [[[0, -1, -1], [1, 0, -1], [2, 1, 0], [3, 2, 1]]]


def test_sparse_bound_counts_causal_selections_and_keeps_the_rest_of_the_step():
    from bench.bound import sparse_bound

    # L = 4 with top-2: rows select 1, 2, 2, 2 keys; 1 layer of 1 head; the dense step is 10 ms, 6 of attention.
    row = sparse_bound(4, 10.0, 6.0, 1.0, layers=1, heads=1, k=2)
    fwd_tflop = 2 * 1 * (1 + 2 + 2 + 2) * (512 + 64 + 512) / 1e12
    goals = next(r for r in row["rates"] if r["rates"] == "goals")
    assert goals["sparse_attention_ms"] == (2 * fwd_tflop / 450 + 2.5 * fwd_tflop / 250) * 1e3
    assert goals["max_speedup"] == 10.0 / (4.0 + goals["sparse_attention_ms"])
    assert goals["rest_ms_for_3x"] == (6.0 - 3 * goals["sparse_attention_ms"]) / 2
    # past k every row selects k: the closed form equals the sum over rows
    long = next(r for r in sparse_bound(5000, 1.0, 1.0, 1.0, layers=1, heads=1)["rates"] if r["rates"] == "targets")
    fwd_tflop = 2 * sum(min(t + 1, 2048) for t in range(5000)) * (512 + 64 + 512) / 1e12
    assert long["sparse_attention_ms"] == pytest.approx((2 * fwd_tflop / 350 + 2.5 * fwd_tflop / 150) * 1e3, rel=1e-12)


def test_relative_difference_in_slices_equals_the_whole_formula():
    from bench.common import rel_diff

    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 37, 3, 5, generator=g).to(torch.bfloat16)
    b = (a.float() + 0.05 * torch.randn(a.shape, generator=g)).to(torch.bfloat16)
    whole = ((a.float() - b.float()).norm() / b.float().norm()).item()
    for rows in (1, 8, 37, 100):  # slices that do and do not divide the 37 tokens
        assert abs(rel_diff(a, b, rows) - whole) < 1e-6 * whole


def test_one_length_process_runs_the_sparse_mla_section_alone_at_that_length():
    from bench.__main__ import length_argv, parse_args

    argv = ["--sections", "topk", "sparse_mla", "e2e", "--lengths", "32768", "65536", "--public-tilelang", "d",
            "--out", "all.json"]
    args = parse_args(length_argv(argv, 65536, "one.json"))
    assert (args.sections, args.lengths, args.out, args.public_tilelang) == (["sparse_mla"], [65536], "one.json", "d")


def test_one_length_process_rows_and_its_failures_become_rows(monkeypatch):
    import json
    import subprocess

    import bench.__main__ as b

    def finished(cmd, timeout):  # a process that measured one row
        out = cmd[cmd.index("--out", cmd.index("--lengths")) + 1]
        with open(out, "w") as f:
            json.dump({"kernels": [{"L": 8, "name": "sparse_mla tilelang fwd", "ms": 1.0}]}, f)
        return subprocess.CompletedProcess(cmd, 0)

    def stalled(cmd, timeout):
        raise subprocess.TimeoutExpired(cmd, timeout)

    monkeypatch.setattr(b.subprocess, "run", finished)
    assert b.sparse_mla_in_own_process(["--public-tilelang", "d"], 8, 5) == [
        {"L": 8, "name": "sparse_mla tilelang fwd", "ms": 1.0}]
    monkeypatch.setattr(b.subprocess, "run", stalled)
    rows = b.sparse_mla_in_own_process(["--public-tilelang", "d"], 8, 5, retries=0)
    assert rows == [{"L": 8, "name": "sparse_mla (own process)",
                     "error": "no result in 5 s (--public-timeout): its process was stopped"}]
    assert "no result in 5 s" in table({"kernels": rows, "e2e": []})
    rows = b.sparse_mla_in_own_process(["--public-tilelang", "d"], 8, 5, retries=2)
    assert rows == [{"L": 8, "name": "sparse_mla (own process)",
                     "error": "no result in 5 s (--public-timeout): its process was stopped (tries: 3)"}]

    calls = []

    def stalls_once(cmd, timeout):  # a hang, then a process that finishes: its rows, no error row
        calls.append(cmd)
        return stalled(cmd, timeout) if len(calls) == 1 else finished(cmd, timeout)
    monkeypatch.setattr(b.subprocess, "run", stalls_once)
    assert b.sparse_mla_in_own_process(["--public-tilelang", "d"], 8, 5) == [
        {"L": 8, "name": "sparse_mla tilelang fwd", "ms": 1.0}]
    assert len(calls) == 2

    def fails(cmd, timeout):  # a process that fails is not started again
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1)
    calls.clear()
    monkeypatch.setattr(b.subprocess, "run", fails)
    rows = b.sparse_mla_in_own_process(["--public-tilelang", "d"], 8, 5, retries=3)
    assert len(calls) == 1 and rows[0]["error"] == "its process exited with status 1"


def test_cudnn_rows_without_the_package_are_one_error_row():
    import importlib.util

    from bench.cudnn import bench_cudnn

    if importlib.util.find_spec("cudnn") is not None:
        pytest.skip("the cuDNN frontend is installed here")
    rows = bench_cudnn(None, torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 8), torch.zeros(1, 4, 2, dtype=torch.long),
                       1.0, 1)
    assert len(rows) == 1 and rows[0]["name"] == "sparse_mla cudnn bwd"
    assert rows[0]["error"].startswith("ModuleNotFoundError")


def _doc_commands(module: str) -> list[str]:
    """Every `python -m <module> ...` command written in the README and docs/ (inside backticks, perhaps wrapped)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    texts = [(root / "README.md").read_text()] + [p.read_text() for p in sorted((root / "docs").glob("*.md"))]
    found = []
    for text in texts:
        for m in re.finditer(r"`python -m (bench(?:\.selection)?)((?: [^`]*)?)`", text):
            if m.group(1) == module:
                found.append(" ".join(m.group(2).split()))
    return found


@pytest.mark.parametrize("module", ["bench", "bench.selection"])
def test_every_bench_command_in_the_docs_parses(module):
    """The docs' commands are runnable as written: each parses with the bench's own argument parser."""
    import shlex

    from bench.__main__ import parse_args as bench_args
    from bench.selection import parse_args as selection_args

    commands = _doc_commands(module)
    assert len(commands) >= (5 if module == "bench" else 1), commands
    for args in commands:
        try:
            (bench_args if module == "bench" else selection_args)(shlex.split(args))
        except SystemExit as e:
            if e.code:  # --help exits with 0
                pytest.fail(f"`python -m {module} {args}` does not parse")


def test_breakdown_gives_each_kernel_to_the_part_that_launched_it():
    from bench.breakdown import classify

    ev = "autograd::engine::evaluate_function: "
    assert classify(["aten::mm", "aten::linear", "dsa::indexer_topk"]) == "indexer top-k"
    assert classify(["triton_", "dsa::absorbed_sparse_mla", "CheckpointFunction"]) == "sparse attention forward"
    assert classify(["triton_", "dsa::absorbed_sparse_mla", ev + "MmBackward0"]) == "sparse attention recomputation"
    assert classify(["aten::bmm", ev + "AbsorbedSparseMLABackward"]) == "sparse attention backward"
    assert classify(["aten::zeros", ev + "SparseIndexerKLBackward"]) == "indexer KL"
    assert classify(["aten::_flash_attention_forward", "aten::_scaled_dot_product_flash_attention"]) == \
        "dense attention"
    assert classify(["aten::mm", ev + "MmBackward0"]) == "GEMMs: projections, MLP, LM head"
    assert classify(["aten::add_", "Optimizer.step#AdamW.step"]) == "everything else"


def test_breakdown_bound_takes_each_part_at_its_anchor_rate():
    """FLOPs per part from the model's shape, and the bound: FLOPs / anchor rate, unanchored parts as measured."""
    from bench.breakdown import ANCHORS, bound, breakdown_table, step_flops
    from tests.conftest import tiny
    from train.model import ModelConfig, build_model

    model = build_model(ModelConfig(arch=tiny(), index_n_heads=4, index_head_dim=16, index_topk=8))
    L = 4096
    f = step_flops(model, L, "sparse", fp8=True)
    linear = sum(p.numel() for p in model.parameters() if p.dim() == 2) - model.model.embed_tokens.weight.numel()
    assert f["GEMMs: projections, MLP, LM head"] == 8 * linear * L
    assert f["indexer top-k"] == 2 * 3 * 4 * 16 * L * (L + 1) / 2  # 3 layers, every causal pair
    selected = 2048 * L - 2048 * 2047 / 2
    # checkpointed: the forward alone (no probabilities), the recomputation with them
    assert f["sparse attention forward"] == 2 * 4 * selected * (32 + 8 + 32) * 3
    assert f["sparse attention recomputation"] == 1.5 * f["sparse attention forward"]
    parts = {"step": 100.0, "GEMMs: projections, MLP, LM head": 10.0, "indexer top-k": 5.0, "indexer KL": 1.0,
             "sparse attention forward": 20.0, "sparse attention recomputation": 20.0,
             "sparse attention backward": 30.0, "dense attention": 0.0, "everything else": 7.0, "GPU idle": 7.0}
    b = bound(parts, f, bf16_tflops=800.0, fp8_tflops=1600.0)
    assert b["parts"]["indexer top-k"] == f["indexer top-k"] / 1600.0 / 1e9  # FP8's rate for an FP8 top-k
    assert b["parts"]["sparse attention forward"] == f["sparse attention forward"] / ANCHORS["sparse_mla_fwd"] / 1e9
    assert b["parts"]["everything else"] == 7.0 and "GPU idle" not in b["parts"]
    assert b["step"] == pytest.approx(sum(b["parts"].values()))
    text = breakdown_table([{"model": "v3-attention", "L": L, "name": "e2e sparse step L=4096", "breakdown": parts,
                             "bound": b}])
    assert "| v3-attention | 4,096 | e2e sparse step L=4096: 100 ms | 10 (10%) | 5 (5%) |" in text


def test_breakdown_counts_each_gpu_activity_once():
    """A kernel counts once, for the op it is listed under, inside the labelled range above that op, or under the
    range itself where no op launched it (Triton's, TileLang's, cuDNN's launches from Python); the GPU span of an
    annotated range (listed under the range with its name, as the profiler does) is not a kernel; the wall time
    left over is idle."""
    from types import SimpleNamespace as E

    from torch.autograd import DeviceType

    from bench.breakdown import parts_of

    cpu = dict(device_type=DeviceType.CPU, is_user_annotation=False)
    label = E(name="dsa::indexer_topk", cpu_parent=None, kernels=[E(name="dsa::indexer_topk", duration=4500.0),
              E(name="_logit_keys_kernel", duration=1500.0)], **dict(cpu, is_user_annotation=True))
    mm = E(name="aten::mm", cpu_parent=label, kernels=[E(name="sm90_gemm", duration=2500.0)], **cpu)
    add = E(name="aten::add_", cpu_parent=None, kernels=[E(name="elementwise", duration=1000.0)], **cpu)
    step = E(name="Optimizer.step#AdamW.step", cpu_parent=None, kernels=[E(name="Optimizer.step#AdamW.step",
             duration=900.0)], **dict(cpu, is_user_annotation=True))
    kernel = E(name="sm90_gemm", device_type=DeviceType.CUDA, is_user_annotation=False, cpu_parent=None,
               kernels=[])  # the activity itself: counted through the op that lists it
    parts = parts_of([label, mm, add, step, kernel], wall=10.0)
    assert parts["indexer top-k"] == 4.0 and parts["everything else"] == 1.0
    assert parts["gpu_busy"] == 5.0 and parts["GPU idle"] == 5.0
    assert parts["everything else, top"] == {"aten::add_: elementwise": 1.0}


def test_the_radix_threshold_experiment_finds_the_kth_largest_visible_key():
    """bench/topk_select.py's radix select (in the interpreter): row r's k-th largest sort key over keys 0..t0 + r,
    negative logits and a run of ties across it included; -inf's key where a row holds at most k."""
    from bench.topk_select import radix_threshold
    from train.ops import triton_topk

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 40, 4, 16, generator=g), torch.randn(1, 60, 16, generator=g)
    w = torch.randn(1, 40, 4, generator=g)
    keys = triton_topk.logit_keys(q, k, w, t0=20)  # rows 20..59 over keys 0..59
    keys[0, 30, :40] = keys[0, 30, 5]
    assert (triton_topk.decode_keys(keys) < 0).any()
    K = 24
    want = torch.tensor([[torch.sort(keys[0, r, : 21 + r], descending=True).values[K - 1].item() if 21 + r > K
                          else triton_topk.NEG_INF_KEY for r in range(40)]], dtype=torch.int32)
    assert (want == triton_topk.NEG_INF_KEY).any()
    assert torch.equal(radix_threshold(keys, K, 20, BS=16), want)
