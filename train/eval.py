"""`python -m train.eval --model DIR`: held-out figures of a model, as JSON on stdout.

Reports the LM loss and perplexity in dense and in sparse mode, the indexer KL (the warm-up loss's
definition) and recall against dense attention, and, on the synthetic corpus, the retrieval accuracy
(next-token accuracy over the replayed half, where each token is the one `recall_distance` back) in both
modes. A dense model (no indexer: a source such as `deepseek_v3` or `qwen3`) reports the dense figures only.

What to read and how comes from the run that made the export (`DIR/../config.yaml`, or `--config`): its
sequence length and its `data.held_out` (the synthetic corpus's `valid.jsonl` by default); `--data` and
`--seq-len` override them, and are needed for an export made elsewhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.data import (
    DataConfig,
    DataError,
    SourceConfig,
    TokenPipeline,
    load_tokenizer,
)
from train.evaluation import emit_json, evaluate, run_settings
from train.model import ModelConfig, build_model
from train.model.hf import CheckpointError, read_config


def evaluate_dir(path: str, args, settings: dict) -> dict:
    config = read_config(path)
    index_dtype = args.index_dtype or settings.get("index_dtype", "auto")
    model = build_model(ModelConfig(path=path, index_topk=args.topk, index_dtype=index_dtype)).eval()
    data_cfg = DataConfig(sources=[SourceConfig(path=settings["data"], text_column=args.text_column)],
                          seq_len=settings["seq_len"])
    tokenizer = load_tokenizer(data_cfg, path)
    pipe = TokenPipeline(data_cfg, tokenizer)
    batches = [pipe.next_batch(args.batch) for _ in range(max(1, args.num_seqs // args.batch))]
    return {"path": path, "data": settings["data"], "index_dtype": index_dtype,
            **evaluate(model, batches, args.topk, "index_topk" in config,
                       settings.get("recall_distance"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory: a converted export (deepseek_v32 or dsa) or a "
                   "dense source of a supported family")
    p.add_argument("--config", default=None, help="the run's config.yaml (default: the one beside --model)")
    p.add_argument("--data", default=None, help="held-out file/folder/glob (default: the run's held-out file)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--seq-len", type=int, default=None, help="default: the run's data.seq_len")
    p.add_argument("--num-seqs", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--topk", type=int, default=None, help="default: the model's index_topk")
    p.add_argument("--index-dtype", default=None, choices=["auto", "fp8", "bf16"],
                   help="the indexer top-k's arithmetic (default: the run's model.index_dtype, else auto: fp8 on "
                        "Hopper GPUs)")
    p.add_argument("--baseline", default=None, help="a dense model to compare with (e.g. the base model)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    try:
        settings = run_settings(args.model, args.config)
        if args.data:  # another file: the synthetic replay distance no longer applies
            settings = {**settings, "data": args.data}
            settings.pop("recall_distance", None)
        settings.update({"seq_len": args.seq_len} if args.seq_len else {})
        missing = [flag for flag, key in (("--data", "data"), ("--seq-len", "seq_len")) if key not in settings]
        if missing:
            raise ValueError(f"{args.model}: no run config beside it ({Path(args.model).parent / 'config.yaml'}); "
                             f"give {' and '.join(missing)}")
        result = evaluate_dir(args.model, args, settings)
        if args.baseline:
            base = evaluate_dir(args.baseline, args, settings)
            result = {"model": result, "baseline": base}
            if "sparse_perplexity" in result["model"]:
                result["sparse_perplexity_vs_baseline_dense"] = (result["model"]["sparse_perplexity"]
                                                                 / base["dense_perplexity"])
            if "sparse_retrieval_accuracy" in result["model"] and "dense_retrieval_accuracy" in base:
                result["sparse_retrieval_accuracy_delta_points"] = 100 * (
                    result["model"]["sparse_retrieval_accuracy"] - base["dense_retrieval_accuracy"])
    except (CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    emit_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
