"""`python -m train.eval --model DIR`: held-out figures of a model, as JSON on stdout.

Reports the LM loss and perplexity in dense and in sparse mode, the indexer KL (the warm-up loss's
definition) and recall against dense attention, and, on the synthetic corpus, the retrieval accuracy
(next-token accuracy over the replayed half, where each token is the one `--recall-distance` back) in both
modes. A `deepseek_v3` model (no indexer) reports the dense figures only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F

from train.data import DataConfig, DataError, SourceConfig, TokenPipeline, load_tokenizer
from train.data.synthetic import retrieval_targets
from train.model import AttentionMode, ModelConfig, build_model
from train.model.hf import CheckpointError, read_config


@torch.no_grad()
def evaluate(model, batches: list[dict], topk: int, with_sparse: bool, recall_distance: int) -> dict:
    sums = {"dense_nll": 0.0, "sparse_nll": 0.0, "kl": 0.0, "recall": 0.0}
    hits = {"dense": 0, "sparse": 0}
    tokens, targets, kl_rows = 0, 0, 0
    for batch in batches:
        ids, labels = batch["input_ids"], batch["labels"]
        spots = [(b, t) for b in range(ids.shape[0]) for t in retrieval_targets(ids[b], recall_distance)]
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
    out = {"tokens": tokens, "topk": topk, "seq_len": batches[0]["input_ids"].shape[1]}
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


def evaluate_dir(path: str, args) -> dict:
    config = read_config(path)
    model = build_model(ModelConfig(path=path, index_topk=args.topk or config.get("index_topk", 2048))).eval()
    data_cfg = DataConfig(sources=[SourceConfig(path=args.data, text_column=args.text_column)], seq_len=args.seq_len)
    tokenizer = load_tokenizer(data_cfg, path)
    pipe = TokenPipeline(data_cfg, tokenizer)
    batches = [pipe.next_batch(args.batch) for _ in range(max(1, args.num_seqs // args.batch))]
    return {"path": path, "data": args.data,
            **evaluate(model, batches, model.index_topk, config["model_type"] == "deepseek_v32", args.recall_distance)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="exported model directory (deepseek_v32 or deepseek_v3)")
    p.add_argument("--data", default="data/generated/synthetic/valid.jsonl", help="held-out file/folder/glob")
    p.add_argument("--text-column", default="text")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--num-seqs", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--recall-distance", type=int, default=256, help="synthetic corpus: replay distance")
    p.add_argument("--topk", type=int, default=None, help="default: the model's index_topk")
    p.add_argument("--baseline", default=None, help="a dense model to compare with (e.g. the base model)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    try:
        result = evaluate_dir(args.model, args)
        if args.baseline:
            base = evaluate_dir(args.baseline, args)
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
