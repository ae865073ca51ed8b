"""The benchmark's tables (pure functions of its JSON, tested on CPU)."""

from __future__ import annotations


_KERNEL_KEYS = {"L", "name", "ms", "tflops", "peak_gib", "total_peak_gib", "error"}


def table(results: dict) -> str:
    lines = ["| L | op | ms | TFLOP/s | peak GiB | compared |", "|---|---|---|---|---|---|"]
    for row in results["kernels"]:
        if "error" in row:
            lines.append(f"| {row['L']:,} | {row['name']} | {row['error']} | | | |")
        else:
            tf = f"{row['tflops']:.0f}" if "tflops" in row else ""
            notes = ", ".join(f"{k} {v}" if isinstance(v, bool) else f"{k} {v:.4g}" for k, v in row.items()
                              if k not in _KERNEL_KEYS and isinstance(v, (float, bool)))
            lines.append(f"| {row['L']:,} | {row['name']} | {row['ms']:.2f} | {tf} | {row['peak_gib']:.2f} | {notes} |")
    lines += ["", "| model | L | step | ms | tokens/s | total peak GiB (model, optimizer state, step) | peak above "
              "the model |", "|---|---|---|---|---|---|---|"]
    for row in results["e2e"]:
        if "L" not in row:
            continue
        model = row.get("model", "1b")
        if "error" in row:
            lines.append(f"| {model} | {row['L']:,} | {row['name']} | {row['error']} | | | |")
        else:
            lines.append(f"| {model} | {row['L']:,} | {row['name']} | {row['ms']:.0f} | {row['tokens_per_sec']:,.0f} | "
                         f"{row['total_peak_gib']:.1f} | {row['peak_gib']:.1f} |")
    return "\n".join(lines)


def sweep_summary(rows: list[dict]) -> str:
    """The fastest configuration of each swept op (name up to its configuration), and how many failed."""
    best: dict[str, dict] = {}
    failed: dict[str, int] = {}
    for row in rows:
        op = row["name"].split(" {")[0]
        if "ms" not in row:
            failed[op] = failed.get(op, 0) + 1
        elif op not in best or row["ms"] < best[op]["ms"]:
            best[op] = row
    lines = ["| op | fastest configuration | ms | failed to run |", "|---|---|---|---|"]
    for op in sorted(set(best) | set(failed)):
        r = best.get(op)
        config, ms = (r["config"], f"{r['ms']:.2f}") if r else ("-", "-")
        lines.append(f"| {op} | {config} | {ms} | {failed.get(op, 0)} |")
    return "\n".join(lines)
