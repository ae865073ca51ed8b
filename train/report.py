"""Curves of runs without wandb, drawn from their metrics.jsonl: `python -m train.report PATH [PATH ...]`
(`make report RUN=...`). A PATH is a stage directory (checkpoints/<run>/<stage>) or a run directory (all its
stages); several are drawn on shared axes. Panels: LM loss (and eval), indexer KL, indexer recall, learning rate,
tokens/s, peak memory, and per-layer KL and recall as heat maps over steps x layers (of the first stage that has
them). Each stage also writes its own `report.png` when it ends."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from train import metrics as M

LINES = ((M.LM_LOSS, "LM loss"), (M.INDEXER_KL, "indexer KL"), (M.RECALL, "indexer recall"), (M.LR, "learning rate"),
         (M.TOKENS_PER_SEC, "tokens/s"), (M.PEAK_MEMORY, "peak memory (GiB)"))
EVAL = {M.LM_LOSS: (M.EVAL_SPARSE_LM, M.EVAL_DENSE_LM), M.INDEXER_KL: (M.EVAL_KL,), M.RECALL: (M.EVAL_RECALL,)}
HEATMAPS = ((M.LAYER_KL + M.PER_LAYER, "indexer KL per layer"), (M.RECALL + M.PER_LAYER, "recall per layer"))


def stage_dirs(path: Path) -> list[Path]:
    """The stage directories a PATH names: itself if it holds metrics.jsonl, else its stages that do."""
    if (path / "metrics.jsonl").is_file():
        return [path]
    found = sorted(p.parent for p in path.glob("*/metrics.jsonl"))
    if not found:
        raise ValueError(f"{path}: no metrics.jsonl in it or in its stage folders; give checkpoints/<run> or "
                         "checkpoints/<run>/<stage>")
    return found


def read_rows(stage: Path) -> list[dict]:
    rows = []
    for n, line in enumerate((stage / "metrics.jsonl").read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{stage / 'metrics.jsonl'}: line {n} is not JSON") from None
    return rows


def _layer_grid(rows: list[dict], prefix: str):
    """(steps, layers, values[layer][step index]) of the keys `prefix<i>`, or None if no row has them."""
    layers = sorted({int(m.group(1)) for r in rows for k in r if (m := re.fullmatch(re.escape(prefix) + r"(\d+)", k))})
    picked = [r for r in rows if any(f"{prefix}{i}" in r for i in layers)]
    if not layers or not picked:
        return None
    nan = float("nan")
    return [r["step"] for r in picked], layers, [[r.get(f"{prefix}{i}", nan) for r in picked] for i in layers]


def draw(paths: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(f"{s.parent.name}/{s.name}", read_rows(s)) for p in paths for s in stage_dirs(p)]
    fig, axes = plt.subplots(2, 4, figsize=(18, 7.5), constrained_layout=True)
    line_axes, heat_axes = [*axes[0], *axes[1][:2]], axes[1][2:]
    for ax, (key, title) in zip(line_axes, LINES):
        ax.set_title(title)
        ax.set_xlabel("step")
        for label, rows in series:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=label, lw=1.2)
            for ev in EVAL.get(key, ()):
                pts = [(r["step"], r[ev]) for r in rows if ev in r]
                if pts:
                    ax.plot(*zip(*pts), "o--", ms=3, lw=1, label=f"{label} {ev}")
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax, (prefix, title) in zip(heat_axes, HEATMAPS):
        grid = next(((label, g) for label, rows in series if (g := _layer_grid(rows, prefix))), None)
        if grid is None:
            ax.set_title(title)
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
            continue
        label, (steps, layers, values) = grid
        im = ax.imshow(values, aspect="auto", origin="lower", interpolation="nearest",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, layers[0] - 0.5, layers[-1] + 0.5))
        ax.set_title(f"{title} ({label})")
        ax.set_xlabel("step")
        ax.set_ylabel("layer")
        ax.set_yticks(layers[:: max(1, len(layers) // 12)])
        fig.colorbar(im, ax=ax)
    fig.suptitle(", ".join(label for label, _ in series))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    tmp.replace(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path, help="run or stage directories")
    ap.add_argument("--out", type=Path, help="default: report.png in the first PATH (one run), or in the current "
                                              "directory (several)")
    args = ap.parse_args(argv)
    try:
        out = args.out or (args.paths[0] / "report.png" if len(args.paths) == 1 else Path("report.png"))
        draw(args.paths, out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[report] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
