"""What every benchmark section shares: timing, error capture, the attention shape, FLOP counts, selections."""

from __future__ import annotations

import time

import torch

# DeepSeek-V3's attention shape: 128 heads, absorbed d_qk 576 = latent 512 + rope 64, d_v 512 (the latent),
# indexer 64 heads x 128, top-2048.
H, DV, DR, G, DI, TOPK = 128, 512, 64, 64, 128, 2048

OPTIONS = {"profile": False, "memory_marks": False}  # set once by the command line


def measure(fn, iters: int, warm: bool = True) -> dict:
    """Median wall time (ms) over `iters` runs after one warm-up run (unless not `warm`: the timed run then
    includes kernel compilation), peak memory above the start and in total (GiB; whatever was allocated
    before, e.g. the model and its optimizer state, counts in the total only)."""
    torch.cuda.synchronize()
    if warm:
        fn()
        torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    peak = torch.cuda.max_memory_allocated()
    return {"ms": sorted(times)[len(times) // 2], "peak_gib": (peak - base) / 2**30, "total_peak_gib": peak / 2**30}


def matmul_tflops(iters: int) -> float:
    """The GPU's bf16 matmul rate, 8192^3 (the ceiling any attention kernel's tensor-core work runs under)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    r = measure(lambda: a @ a, max(iters, 5))
    return 2 * 8192**3 / (r["ms"] * 1e-3) / 1e12


def profile(name: str, fn) -> None:
    """One extra run under torch.profiler: the GPU kernels that took the most time (`--profile`)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"  profile of {name}:\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=12,
                                                                 max_name_column_width=60), flush=True)


def guarded(name: str, fn, iters: int, flops: float | None = None, warm: bool = True) -> dict:
    """`measure` with TFLOP/s; an out-of-memory or a launch the GPU cannot run is recorded, not fatal."""
    try:
        r = measure(fn, iters, warm)
        if OPTIONS["profile"]:
            profile(name, fn)
        if flops:
            r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
    except torch.OutOfMemoryError:
        r = {"error": "out of memory"}
    except Exception as e:  # noqa: BLE001 -- a launch configuration the GPU cannot run (shared memory): record it
        r = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    torch.cuda.empty_cache()
    print(f"  {name}: {r}", flush=True)
    return {"name": name, **r}


def failed_row(name: str, e: Exception) -> dict:
    """The row of a step that raised, printed at once (the tables come only at the end of a run)."""
    row = {"name": name, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    print(f"  {name}: {row['error']}", flush=True)
    return row


def mark(what: str) -> None:
    """`--memory-marks`: memory held at this point of a step (what stays allocated between phases)."""
    if OPTIONS["memory_marks"]:
        torch.cuda.synchronize()
        print(f"  [memory] {what}: {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated, "
              f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB peak so far", flush=True)


def sparse_mla_flops(heads: int, selected: int) -> float:
    """Sparse MLA forward FLOPs: scores over d_qk (576) and values over d_v (512) for every valid (query, key)
    pair and head (`selected` counts valid selections only); the backward counts 2.5x this."""
    return 2 * heads * selected * (DV + DR + DV)


def causal_selection(L: int, k: int, device) -> torch.Tensor:
    """[1, L, k] random causal positions (row t draws from 0..t), -1 where t + 1 < k."""
    t = torch.arange(L, device=device)[:, None]
    idx = (torch.rand(L, k, device=device) * (t + 1)).long()
    j = torch.arange(k, device=device)[None, :]
    idx = torch.where(t + 1 >= k, idx, torch.where(j <= t, j, -1))
    return idx[None]


def window_selection(L: int, k: int, device) -> torch.Tensor:
    """[1, L, k]: row t selects t, t-1, ..., t-k+1 (-1 below 0): neighbouring rows share all but one row."""
    idx = torch.arange(L, device=device)[:, None] - torch.arange(k, device=device)[None, :]
    return idx.masked_fill(idx < 0, -1)[None]


def rel_diff(a: torch.Tensor, b: torch.Tensor, rows: int = 4096) -> float:
    """|a - b| / |b| over [B, L, ...] tensors, in fp32 a slice of `rows` tokens at a time: whole fp32 copies of a
    128K-token output would take more than 100 GB."""
    num = den = 0.0
    for t0 in range(0, a.shape[1], rows):
        x, y = a[:, t0 : t0 + rows].float(), b[:, t0 : t0 + rows].float()
        num += (x - y).square().sum().item()
        den += y.square().sum().item()
    return (num / den) ** 0.5
