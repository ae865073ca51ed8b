"""`python -m bench.selection --model DIR`: under GQA, what one selection per query (shared by all key groups, as
the conversion does) costs each group's attention, against one selection per group.

For each layer, over held-out queries that see more than k tokens, the share of a key group's dense attention
(its query heads' average) that a top-k keeps, averaged over groups:
  group_oracle      each group's own top-k of its own attention: the best a per-group selection could do
  shared_oracle     the top-k of the attention summed over all heads, shared by the groups: the best one shared
                    selection could do (what the warm-up target teaches the indexer)
  shared_indexer    the model's own indexer's top-k (a converted model; left out for a dense source)
  shared_indexer_fp8  the same indexer's top-k in FP8 (DeepSeek's e4m3 form, `model.index_dtype=fp8`), and
                    fp8_kept: the share of the indexer's own (unquantised) selection that it keeps
The shared figures are also the recall of the head-summed attention that training reports (the mean over groups
of a group's share is the head-summed attention's share). group_oracle - shared_oracle bounds what per-group
selections could add. CPU is fine: this is a probe on short
sequences (it forms [H, L, L] per layer). The data and sequence length come from the run, as for `train.eval`.
"""

from __future__ import annotations

import argparse
import sys

import torch

from train.data import DataConfig, DataError, SourceConfig, TokenPipeline, load_tokenizer
from train.evaluation import emit_json, run_settings
from train.model import AttentionMode, ModelConfig, build_model
from train.model.attention import GQAAttention
from train.model.hf import CheckpointError, read_config
from train.ops import reference


def _mass(p_XTS: torch.Tensor, top_XTK: torch.Tensor) -> torch.Tensor:
    return p_XTS.gather(-1, top_XTK.expand(*p_XTS.shape[:-2], *top_XTK.shape[-2:])).sum(-1)


@torch.no_grad()
def group_recalls(model, ids_BL: torch.Tensor, topk: int, with_indexer: bool) -> list[dict]:
    """Per layer: the recalls of the module docstring, averaged over queries t >= topk of `ids_BL`."""
    B, L = ids_BL.shape
    h = model.model.embed_tokens(ids_BL)
    cos, sin = model.model.rotary_emb(h, torch.arange(L)[None])
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    rows = []
    for layer in model.layers:
        attn = layer.self_attn
        if not isinstance(attn, GQAAttention):
            raise ValueError("the selection probe compares key groups: a GQA / MHA model is needed")
        x = layer.input_layernorm(h)
        q, k, _ = attn.project(x, cos, sin)
        J, R = attn.num_kv_heads, attn.num_heads // attn.num_kv_heads
        scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float().repeat_interleave(R, dim=2))
        att = (scores * attn.softmax_scale).masked_fill(~causal, float("-inf")).softmax(-1)
        p_group = att.view(B, J, R, L, L).mean(2)  # [B, J, L, L]
        p_all = p_group.mean(1)  # [B, L, L]
        shared = reference.topk_stable(p_all, topk)[1][:, None]
        row = {"group_oracle": _mass(p_group, reference.topk_stable(p_group, topk)[1]),
               "shared_oracle": _mass(p_group, shared)}
        if with_indexer:
            qi, ki, wi = attn.indexer(x, x, cos, sin)
            picked = reference.topk_stable(reference.indexer_logits(qi, ki, wi, 0), topk)[1][:, None]
            row["shared_indexer"] = _mass(p_group, picked)
            fp8 = reference.indexer_topk_fp8(qi, ki, wi, topk).clamp(min=0)[:, None]  # rows t >= topk: all valid
            row["shared_indexer_fp8"] = _mass(p_group, fp8)
            same = (fp8[..., :, None] == picked[..., None, :]).any(-1)  # [B, 1, L, K]
            row["fp8_kept"] = same.float().mean(-1)
        rows.append({name: v[..., topk:].mean().item() for name, v in row.items()})
        h = layer(h, cos, sin, AttentionMode())
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.selection", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a GQA model directory: a dense source or a converted export")
    p.add_argument("--config", default=None, help="the run's config.yaml (default: the one beside --model)")
    p.add_argument("--data", default=None, help="held-out text (default: the run's)")
    p.add_argument("--seq-len", type=int, default=None, help="default: the run's data.seq_len")
    p.add_argument("--num-seqs", type=int, default=16)
    p.add_argument("--topk", type=int, required=True)
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    emit_json(result, args.out)
    return 0


def run(args: argparse.Namespace) -> dict:
    settings = run_settings(args.model, args.config)
    settings.update({k: v for k, v in (("data", args.data), ("seq_len", args.seq_len)) if v})
    missing = [flag for flag, key in (("--data", "data"), ("--seq-len", "seq_len")) if key not in settings]
    if missing:
        raise ValueError(f"{args.model}: no run config beside it; give {' and '.join(missing)}")
    model = build_model(ModelConfig(path=args.model)).float().eval()
    data_cfg = DataConfig(sources=[SourceConfig(path=settings["data"])], seq_len=settings["seq_len"])
    pipe = TokenPipeline(data_cfg, load_tokenizer(data_cfg, args.model))
    ids = torch.cat([pipe.next_batch(1)["input_ids"] for _ in range(args.num_seqs)])
    layers = group_recalls(model, ids, args.topk, "index_topk" in read_config(args.model))
    return {"model": args.model, "topk": args.topk, "seq_len": settings["seq_len"], "layers": layers,
            "mean": {k: sum(r[k] for r in layers) / len(layers) for k in layers[0]}}


if __name__ == "__main__":
    sys.exit(main())
