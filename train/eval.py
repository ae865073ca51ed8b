"""`python -m train.eval --model DIR`: held-out figures of a model, as JSON on stdout.

Reports the LM loss and perplexity in dense and in sparse mode, the indexer KL (the warm-up loss's
definition) and recall against dense attention, and, on the synthetic corpus, the retrieval accuracy
(next-token accuracy over the replayed half, where each token is the one `recall_distance` back) in both
modes. A `deepseek_v3` model (no indexer) reports the dense figures only.

What to read and how comes from the run that made the export (`DIR/../config.yaml`, or `--config`): its
sequence length, and its held-out file (the synthetic corpus's `valid.jsonl`); `--data` and `--seq-len`
override them, and are needed for an export made elsewhere.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F

from pathlib import Path

from omegaconf import OmegaConf

from train.data import DataConfig, DataError, SourceConfig, TokenPipeline, load_tokenizer
from train.data.synthetic import retrieval_targets
from train.model import AttentionMode, ModelConfig, build_model
from train.model.hf import CheckpointError, read_config


@torch.no_grad()
def evaluate(model, batches: list[dict], topk: int | None, with_sparse: bool, recall_distance: int | None) -> dict:
    """`topk`: the sparse mode's (None: the model's `index_topk`); `recall_distance`: the synthetic corpus's
    replay distance (None: other text, no retrieval accuracy)."""
    sums = {"dense_nll": 0.0, "sparse_nll": 0.0, "kl": 0.0, "recall": 0.0}
    hits = {"dense": 0, "sparse": 0}
    tokens, targets, kl_rows = 0, 0, 0
    for batch in batches:
        ids, labels = batch["input_ids"], batch["labels"]
        spots = [(b, t) for b in range(ids.shape[0]) for t in retrieval_targets(ids[b], recall_distance)
                 ] if recall_distance else []
        modes = {"dense": AttentionMode(sparse=False, indexer_loss=with_sparse, topk=topk)}
        if with_sparse:
            modes["sparse"] = AttentionMode(sparse=True, topk=topk)
        for name, mode in modes.items():
            logits = model(ids, mode).float()
            sums[f"{name}_nll"] += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
            for b, t in spots:
                hits[name] += int(logits[b, t].argmax().item() == labels[b, t].item())
            if name == "dense" and with_sparse:
                stats = model.layer_stats()
                sums["kl"] += sum(s.kl_BL.sum().item() for s in stats) / len(stats)
                sums["recall"] += sum(s.recall_BL.sum().item() for s in stats) / len(stats)
                kl_rows += ids.numel()
        tokens += ids.numel()
        targets += len(spots)
    out = {"tokens": tokens, "topk": topk or model.index_topk, "seq_len": batches[0]["input_ids"].shape[1]}
    for name in ("dense", "sparse") if with_sparse else ("dense",):
        loss = sums[f"{name}_nll"] / tokens
        out[f"{name}_lm_loss"], out[f"{name}_perplexity"] = loss, math.exp(loss)
        if targets:
            out[f"{name}_retrieval_accuracy"] = hits[name] / targets
    if with_sparse:
        out["indexer_kl"], out["indexer_recall"] = sums["kl"] / kl_rows, sums["recall"] / kl_rows
    if targets:
        out["retrieval_targets"] = targets
    return out


def run_settings(model_dir: str, config_file: str | None) -> dict:
    """Held-out file, sequence length and replay distance of the run that wrote `model_dir` (its config.yaml
    beside the export), or {} when there is none."""
    path = Path(config_file) if config_file else Path(model_dir).parent / "config.yaml"
    if not path.is_file():
        if config_file:
            raise ValueError(f"--config {config_file}: no such file")
        return {}
    data = OmegaConf.load(path).data
    out = {"seq_len": data.seq_len}
    if data.get("synthetic"):
        out["data"] = str(Path(data.generated_dir) / "valid.jsonl")
        out["recall_distance"] = data.synthetic.recall_distance
    return out


def evaluate_dir(path: str, args, settings: dict) -> dict:
    config = read_config(path)
    model = build_model(ModelConfig(path=path, index_topk=args.topk)).eval()
    data_cfg = DataConfig(sources=[SourceConfig(path=settings["data"], text_column=args.text_column)],
                          seq_len=settings["seq_len"])
    tokenizer = load_tokenizer(data_cfg, path)
    pipe = TokenPipeline(data_cfg, tokenizer)
    batches = [pipe.next_batch(args.batch) for _ in range(max(1, args.num_seqs // args.batch))]
    return {"path": path, "data": settings["data"],
            **evaluate(model, batches, args.topk, config["model_type"] == "deepseek_v32",
                       settings.get("recall_distance"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="exported model directory (deepseek_v32 or deepseek_v3)")
    p.add_argument("--config", default=None, help="the run's config.yaml (default: the one beside --model)")
    p.add_argument("--data", default=None, help="held-out file/folder/glob (default: the run's held-out file)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--seq-len", type=int, default=None, help="default: the run's data.seq_len")
    p.add_argument("--num-seqs", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--topk", type=int, default=None, help="default: the model's index_topk")
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
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
