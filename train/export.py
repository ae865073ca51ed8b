"""`python -m train.export`: write a DSA model in the `deepseek_v32` Hugging Face format.

From a dense DeepSeek-V3 checkpoint this attaches fresh indexers (what `make warmup` starts from); from a
`deepseek_v32` directory it re-exports (e.g. to change `index_topk` or dtype). Everything is validated
before anything is written, and the output appears only once complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.model import ModelConfig, build_model
from train.model.hf import CheckpointError, export_hf
from train.model.surgery import DTYPES


def convert_checkpoint(cfg: ModelConfig, out_dir: str | Path) -> Path:
    """Surgery and export; the source's tokenizer (where it has one) goes along."""
    from transformers import AutoTokenizer

    model = build_model(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, local_files_only=True)
    except (OSError, ValueError):  # a checkpoint without a tokenizer: the export has none either
        tokenizer = None
    return export_hf(model, out_dir, tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="local Hugging Face directory (deepseek_v3 or deepseek_v32)")
    p.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    p.add_argument("--index-n-heads", type=int, default=None)
    p.add_argument("--index-head-dim", type=int, default=None)
    p.add_argument("--index-topk", type=int, default=None, help="default: the source's, else 2048")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: the source's own")
    args = p.parse_args(argv)
    cfg = ModelConfig(path=args.source, index_n_heads=args.index_n_heads, index_head_dim=args.index_head_dim,
                      index_topk=args.index_topk, dtype=args.dtype)
    try:
        out = convert_checkpoint(cfg, args.out)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
