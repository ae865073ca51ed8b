"""Held-out figures of a DSA model (library): dense- and sparse-mode LM loss and perplexity, the indexer's KL and
recall against dense attention, and on the synthetic corpus the retrieval accuracy. Training logs them as `eval/*`
(train/loop.py); `python -m train.eval` (train/eval.py) prints them for an exported model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from train.data.synthetic import retrieval_targets
from train.model import AttentionMode


def _head_nll(model, h_NC: torch.Tensor, labels_N: torch.Tensor, chunk_tokens: int = 4096) -> torch.Tensor:
    """Summed next-token cross-entropy from final hidden states, the LM head in chunks (no [tokens, vocab])."""
    total = h_NC.new_zeros((), dtype=torch.float32)
    for n0 in range(0, h_NC.shape[0], chunk_tokens):
        logits = model.lm_head(h_NC[n0 : n0 + chunk_tokens]).float()
        total += F.cross_entropy(logits, labels_N[n0 : n0 + chunk_tokens], reduction="sum")
    return total


@torch.no_grad()
def eval_sums(model, batches: list[dict], topk: int | None, with_sparse: bool,
              recall_distance: int | None) -> dict[str, torch.Tensor]:
    """Sums over `batches` (a rank's share: training adds them up over ranks before `summarize`): tokens, LM
    negative log-likelihood in dense and sparse mode, the indexer's KL and recall (warm-up definition) and, with
    `recall_distance` (the synthetic corpus's replay distance), retrieval hits and targets.
    `topk`: the sparse mode's (None: the model's `index_topk`)."""
    device = batches[0]["input_ids"].device
    cp = model.context_parallel  # a context-parallel rank sums over its own tokens (the group adds them up)
    sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in (
        "tokens", "dense_nll", "sparse_nll", "kl", "recall", "dense_hits", "sparse_hits", "targets")}
    for batch in batches:
        ids, labels = batch["input_ids"], cp.shard(batch["labels"])
        row = {g: i for i, g in enumerate(cp.positions(ids.shape[1], "cpu").tolist())}  # global -> the rank's row
        spots = [(b, row[t]) for b in range(ids.shape[0]) for t in retrieval_targets(ids[b], recall_distance)
                 if t in row] if recall_distance else []
        modes = {"dense": AttentionMode(sparse=False, indexer_loss=with_sparse, topk=topk)}
        if with_sparse:
            modes["sparse"] = AttentionMode(sparse=True, topk=topk)
        for name, mode in modes.items():
            h_BLC = model.hidden_states(ids, mode)
            sums[f"{name}_nll"] += _head_nll(model, h_BLC.flatten(0, 1), labels.flatten()).double()
            if spots:
                b, t = torch.tensor(spots, device=device).T
                guess = model.lm_head(h_BLC[b, t]).argmax(-1)
                sums[f"{name}_hits"] += (guess == labels[b, t]).sum()
            if name == "dense" and with_sparse:
                stats = model.layer_stats()
                sums["kl"] += sum(s.kl_BL.double().sum() for s in stats) / len(stats)
                sums["recall"] += sum(s.recall_BL.double().sum() for s in stats) / len(stats)
        sums["tokens"] += labels.numel()
        sums["targets"] += len(spots)
    return sums


def summarize(sums: dict, with_sparse: bool) -> dict:
    """Losses, perplexities, KL, recall and retrieval accuracy from `eval_sums`' sums."""
    sums = {k: float(v) for k, v in sums.items()}
    tokens, targets = sums["tokens"], sums["targets"]
    out = {}
    for name in ("dense", "sparse") if with_sparse else ("dense",):
        loss = sums[f"{name}_nll"] / tokens
        out[f"{name}_lm_loss"], out[f"{name}_perplexity"] = loss, math.exp(loss)
        if targets:
            out[f"{name}_retrieval_accuracy"] = sums[f"{name}_hits"] / targets
    if with_sparse:
        out["indexer_kl"], out["indexer_recall"] = sums["kl"] / tokens, sums["recall"] / tokens
    return out


def evaluate(model, batches: list[dict], topk: int | None, with_sparse: bool, recall_distance: int | None) -> dict:
    """The figures of `model` on `batches` (see `eval_sums`)."""
    sums = eval_sums(model, batches, topk, with_sparse, recall_distance)
    out = {"tokens": int(sums["tokens"]), "seq_len": batches[0]["input_ids"].shape[1]}
    if with_sparse:
        out["topk"] = topk or model.index_topk
    out.update(summarize(sums, with_sparse))
    if sums["targets"]:
        out["retrieval_targets"] = int(sums["targets"])
    return out


def run_settings(model_dir: str, config_file: str | None) -> dict:
    """Held-out file, sequence length, replay distance and the indexer top-k's arithmetic (`model.index_dtype`) of
    the run that wrote `model_dir` (its config.yaml beside the export), or {} when there is none."""
    path = Path(config_file) if config_file else Path(model_dir).parent / "config.yaml"
    if not path.is_file():
        if config_file:
            raise ValueError(f"--config {config_file}: no such file")
        return {}
    run = OmegaConf.load(path)
    data = run.data
    out = {"seq_len": data.seq_len}
    if run.get("model") and run.model.get("index_dtype"):
        out["index_dtype"] = run.model.index_dtype
    if data.get("held_out"):
        out["data"] = data.held_out
    if data.get("synthetic"):
        out["recall_distance"] = data.synthetic.recall_distance
    return out


def emit_json(result: dict, out: str | None) -> None:
    """A command's figures as JSON on stdout, and in the file `out` too when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
