"""`make bench` (`python -m bench [options]`): kernels, end-to-end steps and the bound on a CUDA GPU; JSON to --out
and markdown tables on stdout. A failure (out of memory, a launch the GPU cannot run) is recorded, not fatal."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.bound import bench_bound, bound_table
from bench.breakdown import breakdown_table
from bench.common import DI, OPTIONS, G, H
from bench.e2e import MODELS, bench_e2e
from bench.kernels import bench_sdpa, bench_sparse_gqa, bench_sparse_mla, bench_topk, bench_warmup_kl
from bench.report import sweep_summary, table
from bench.sweep import compiled_stats, sweep


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[8192, 32768, 65536, 131072])
    ap.add_argument("--topk-lengths", type=int, nargs="*", default=[8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--e2e-lengths", type=int, nargs="*", default=[32768, 65536, 131072])
    ap.add_argument("--warmup-max", type=int, default=131072, help="longest warm-up step timed end to end")
    ap.add_argument("--twin-max", type=int, default=32768, help="longest length the PyTorch twins are timed at")
    ap.add_argument("--plain-max", type=int, default=16384, help="longest length plain PyTorch top-k is tried at")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--sparse-mla-backends", nargs="*", default=["triton", "tilelang"], choices=["triton", "tilelang"],
                    help="the sparse MLA kernels timed (those this machine runs)")
    ap.add_argument("--sections", nargs="*", default=["topk", "sparse_mla", "sdpa", "warmup_kl", "e2e", "bound"],
                    help="bound: the fastest a sparse step of the 1B model could be against its dense step "
                         "(at the e2e lengths; runs the dense step if e2e did not)")
    ap.add_argument("--e2e-stages", nargs="*", default=["base", "warmup", "sparse"])
    ap.add_argument("--e2e-cold-from", type=int, default=131072,
                    help="end-to-end steps this long are timed once, without a warm-up run")
    ap.add_argument("--e2e-index-heads", type=int, default=G,
                    help="end to end: indexer heads (DeepSeek's 64 by default)")
    ap.add_argument("--e2e-index-dim", type=int, default=DI, help="end to end: indexer head dim")
    ap.add_argument("--e2e-models", nargs="*", default=["v3-attention", "1b"], choices=sorted(MODELS),
                    help="end to end: DeepSeek-V3's or Qwen3-32B's attention shape in 2 layers, and/or the ~1B model")
    ap.add_argument("--e2e-index-dtype", default="auto", choices=["auto", "fp8", "bf16"],
                    help="end to end: the indexer top-k's arithmetic (model.index_dtype; auto: fp8 on Hopper)")
    ap.add_argument("--breakdown", action="store_true",
                    help="end to end: split each step's GPU time by part (profiler) and give the step's bound if "
                         "each part ran at its anchor's rate (bench/breakdown.py)")
    ap.add_argument("--recompute-topk", action="store_true",
                    help="end to end: recompute each layer's top-k in backward (stage.recompute_topk=true)")
    ap.add_argument("--sweep", nargs="*", choices=["warmup_kl", "sparse_mla", "tilelang_sparse_mla"],
                    help="only sweep these kernels' launch configurations, at the first of --lengths")
    ap.add_argument("--sparse-mla-heads", type=int, default=H,
                    help="the sparse_mla section's head count (rows are named with it where it is not the default)")
    ap.add_argument("--sweep-heads", type=int, default=128, help="the sparse MLA sweep's head count")
    ap.add_argument("--memory-marks", action="store_true",
                    help="end to end: print allocated memory after each step's forward and backward")
    ap.add_argument("--profile", action="store_true", help="print each op's top GPU kernels (torch.profiler)")
    ap.add_argument("--public-tilelang", metavar="DIR",
                    help="time the public TileLang sparse MLA kernels (a tilelang checkout's examples/deepseek_v32) "
                         "beside ours, on the same inputs")
    ap.add_argument("--public-indexer", metavar="DIR",
                    help="with --sections topk: time the public TileLang FP8 indexer kernels (fp8_lighting_indexer, "
                         "topk_selector: a tilelang checkout's examples/deepseek_v32) beside ours")
    ap.add_argument("--public-flashmla", action="store_true",
                    help="with --sections sparse_mla: time FlashMLA's SM90 sparse forward (sgl-flash-mla) beside ours, "
                         "its output compared")
    ap.add_argument("--cudnn", action="store_true",
                    help="time NVIDIA cuDNN frontend's sparse-attention backward (nvidia-cudnn-frontend, Hopper) "
                         "beside TileLang's, on the same inputs")
    ap.add_argument("--public-timeout", type=float, default=1200,
                    help="with --public-tilelang and several lengths: seconds each length's own process may take")
    ap.add_argument("--public-retries", type=int, default=1,
                    help="with --public-tilelang and several lengths: how many times a length's process stopped by "
                         "--public-timeout is started again")
    ap.add_argument("--out", default="bench.json")
    return ap.parse_args(argv)


def length_argv(argv: list[str], L: int, out: str) -> list[str]:
    """The command line of one length's own process: the caller's, with the sparse MLA section alone at length L
    writing to `out` (the later flags win)."""
    return [*argv, "--sections", "sparse_mla", "--lengths", str(L), "--out", out]


def sparse_mla_in_own_process(argv: list[str], L: int, timeout: float, retries: int = 1) -> list[dict]:
    """One length's sparse MLA rows from a fresh `python -m bench` process. The public forward has hung at random,
    at any length; a process per length, under a time limit, keeps one hang from costing the other lengths, and a
    process stopped by that limit is started again, `retries` times at most. A process that fails, or that runs
    out of time on its last try, leaves an error row."""
    for attempt in range(retries + 1):
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "bench.json")
            try:
                done = subprocess.run([sys.executable, "-m", "bench", *length_argv(argv, L, out)], timeout=timeout)
                error = None if done.returncode == 0 else f"its process exited with status {done.returncode}"
                stalled = False
            except subprocess.TimeoutExpired:
                error = f"no result in {timeout:.0f} s (--public-timeout): its process was stopped"
                stalled = True
            rows = json.loads(Path(out).read_text())["kernels"] if Path(out).exists() else []
        if not (stalled and attempt < retries):
            break
        print(f"  sparse_mla L={L}: {error}; starting it again (--public-retries)", flush=True)
    if error:
        tries = f" (tries: {attempt + 1})" if attempt else ""
        print(f"  sparse_mla L={L}: {error}{tries}", flush=True)
        rows.append({"L": L, "name": "sparse_mla (own process)", "error": error + tries})
    return rows


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    OPTIONS.update(profile=args.profile, memory_marks=args.memory_marks)
    if not torch.cuda.is_available():
        raise SystemExit("error: make bench needs a CUDA GPU")
    from train import ops
    from train.ops import cudnn_sparse_mla, flashmla_sparse_mla

    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "kernels_backend": ops.backend(),
               "cudnn_backward_importable": cudnn_sparse_mla.importable(),
               "flashmla_forward_importable": flashmla_sparse_mla.importable(), "kernels": [], "e2e": []}

    def save():  # after every section, so that a cut run keeps what it measured
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    if args.sweep:
        results["sweep"] = sweep(args.lengths[0], args.iters, args.sweep, args.sweep_heads)
        results["compiled"] = compiled_stats()
        save()
        print(sweep_summary(results["sweep"]))
        for row in results["compiled"]:
            print(f"  [compiled] {row}")
        print(f"[bench] wrote {args.out}")
        return
    for L in args.topk_lengths if "topk" in args.sections else []:
        print(f"[topk] L={L}", flush=True)
        results["kernels"] += [{"L": L, **r} for r in bench_topk(L, args.iters, args.twin_max, args.plain_max,
                                                                   args.public_indexer)]
        save()
    for L in args.topk_lengths if "topk_select" in args.sections else []:
        from bench.topk_select import bench_topk_select

        print(f"[topk_select] L={L}", flush=True)
        results["kernels"] += [{"L": L, **r} for r in bench_topk_select(L, args.iters)]
        save()
    sections = {"sparse_mla": lambda L: bench_sparse_mla(L, args.iters, args.twin_max, args.sparse_mla_heads,
                                                    public=args.public_tilelang, backends=args.sparse_mla_backends,
                                                    cudnn=args.cudnn, flashmla=args.public_flashmla),
                "sdpa": lambda L: bench_sdpa(L, args.iters),
                "sparse_gqa": lambda L: bench_sparse_gqa(L, args.iters),
                "warmup_kl": lambda L: bench_warmup_kl(L, args.iters, args.twin_max)}
    # --public-tilelang over several lengths: the sparse MLA rows of each length in its own process
    own_process = bool(args.public_tilelang) and len(args.lengths) > 1 and "sparse_mla" in args.sections
    for L in args.lengths if own_process else []:
        print(f"[sparse_mla] L={L}, in its own process", flush=True)
        results["kernels"] += sparse_mla_in_own_process(argv, L, args.public_timeout, args.public_retries)
        save()
    for L in args.lengths:
        for name, fn in sections.items():
            if name in args.sections and not (own_process and name == "sparse_mla"):
                print(f"[{name}] L={L}", flush=True)
                results["kernels"] += [{"L": L, **r} for r in fn(L)]
                save()
    e2e_iters = max(1, args.iters // 2)
    if args.e2e_lengths and "e2e" in args.sections:
        for model in args.e2e_models:
            results["e2e"] += [{**r, "model": model} for r in bench_e2e(
                args.e2e_lengths, e2e_iters, args.warmup_max, args.e2e_stages, args.e2e_cold_from, args.recompute_topk,
                args.e2e_index_heads, args.e2e_index_dim, MODELS[model], args.e2e_index_dtype, args.breakdown)]
        save()
    if args.e2e_lengths and "bound" in args.sections:
        print("[bound] the fastest possible sparse step of the 1B model against its dense step", flush=True)
        if not any(r.get("name", "").startswith("e2e dense step") and r.get("model") == "1b" for r in results["e2e"]):
            results["e2e"] += [{**r, "model": "1b"} for r in bench_e2e(args.e2e_lengths, e2e_iters, args.warmup_max,
                                                                        ["base"], args.e2e_cold_from)]
        results["bound"] = bench_bound(results["e2e"], args.iters)
        save()
    print(table(results))
    if args.breakdown:
        print(breakdown_table(results["e2e"]))
    if results.get("bound"):
        print(bound_table(results["bound"]))
    print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()
