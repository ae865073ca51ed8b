"""Two losses, two owners: in the sparse stage the LM loss reaches only the main model, the indexer KL only
the indexers; in the warm-up only the indexers get gradients and the backbone builds no graph."""

import pytest
import torch

from tests.conftest import TINY_INDEX, perturb_, tiny
from train.model import ModelConfig, build_model
from train import metrics as M
from train.stages import STAGES, StageConfig, compute_loss, mode_of, param_groups, settle_metrics


def _setup(tiny_arch, stage):
    model = build_model(ModelConfig(arch=tiny_arch, **TINY_INDEX))
    perturb_(model, seed=1)
    groups = param_groups(model, STAGES[stage], StageConfig(name=stage))
    ids = torch.randint(0, tiny_arch["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    return model, groups, ids, torch.roll(ids, -1, 1)


def _grad_norms(params):
    return [0.0 if p.grad is None else p.grad.norm().item() for p in params]


def test_sparse_lm_loss_reaches_only_the_main_model(tiny_arch):
    model, groups, ids, labels = _setup(tiny_arch, "sparse")
    backbone, indexer = groups[0]["params"], groups[1]["params"]
    mode = mode_of(STAGES["sparse"])
    assert mode.sparse and mode.indexer_loss
    lm_sum, n = model.lm_loss(ids, labels, mode)
    (lm_sum / n).backward()
    assert all(g == 0.0 for g in _grad_norms(indexer))
    assert sum(g > 0 for g in _grad_norms(backbone)) > 0.9 * len(backbone)


def test_sparse_indexer_loss_reaches_only_the_indexers(tiny_arch):
    model, groups, ids, labels = _setup(tiny_arch, "sparse")
    backbone, indexer = groups[0]["params"], groups[1]["params"]
    _, metrics = compute_loss(model, STAGES["sparse"], StageConfig(name="sparse"), ids, labels)
    kl = torch.stack([s.kl_BL.mean() for s in model.layer_stats()]).mean()
    kl.backward()
    assert all(g == 0.0 for g in _grad_norms(backbone))
    assert all(g > 0 for g in _grad_norms(indexer))
    assert metrics["loss/indexer_kl"].item() > 0
    assert all(s.topk_BLK is None for s in model.layer_stats()), "training keeps no L x k selection alive"


def test_warmup_trains_only_indexers_without_a_backbone_graph(tiny_arch):
    model, groups, ids, labels = _setup(tiny_arch, "warmup")
    assert [g["name"] for g in groups] == ["indexer"]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.indexer_parameters()}
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".indexer." not in n)
    h = model.hidden_states(ids, mode_of(STAGES["warmup"]))
    assert h.grad_fn is None, "the frozen backbone builds no autograd graph"
    loss, metrics = compute_loss(model, STAGES["warmup"], StageConfig(name="warmup"), ids, labels)
    loss.backward()
    assert "loss/lm" not in metrics and 0 < metrics["indexer/recall"].item() <= 1
    assert all(g > 0 for g in _grad_norms(groups[0]["params"]))


def test_activation_checkpointing_keeps_topk_for_recompute(tiny_arch, monkeypatch):
    """Under checkpointing, the sparse step's metrics and every gradient equal the plain run's, whether each
    layer's top-k is kept for the recomputation (one selection per layer) or recomputed (two). The indexer KL is
    computed in backward there: the forward leaves it at zeros and its metrics out until `settle_metrics`."""
    from train import ops

    calls = []
    real = ops.indexer_topk
    monkeypatch.setattr(ops, "indexer_topk", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, groups, ids, labels = _setup(tiny_arch, "sparse")
    params = [p for g in groups for p in g["params"]]
    stage, cfg = STAGES["sparse"], StageConfig(name="sparse")
    res = {}
    for name, ckpt, keep in (("plain", False, True), ("kept", True, True), ("recomputed", True, False)):
        model.activation_checkpointing, model.keep_topk_for_recompute = ckpt, keep
        calls.clear()
        loss, metrics = compute_loss(model, stage, cfg, ids, labels)
        kl_before = [s.kl_BL for s in model.layer_stats()]
        assert all(s.kl_in_backward == ckpt for s in model.layer_stats())
        assert (M.INDEXER_KL in metrics) == (not ckpt) and (M.TOTAL_LOSS in metrics) == (not ckpt)
        if ckpt:
            assert all(torch.equal(kl, torch.zeros_like(kl)) for kl in kl_before)
            assert torch.equal(loss, metrics[M.LM_LOSS])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        # The recomputation leaves the stats alone: a recomputed KL there would keep its graph alive.
        assert all(s.kl_BL is kl for s, kl in zip(model.layer_stats(), kl_before))
        res[name] = (settle_metrics(model, stage, cfg, metrics), grads, len(calls),
                     [s.kl_BL.detach().clone() for s in model.layer_stats()])
    layers = tiny_arch["num_hidden_layers"]
    assert [res[n][2] for n in ("plain", "kept", "recomputed")] == [layers, layers, 2 * layers]
    assert res["plain"][0][M.INDEXER_KL] > 0
    for name in ("kept", "recomputed"):
        assert res[name][0].keys() == res["plain"][0].keys()
        for key, want in res["plain"][0].items():
            assert torch.equal(res[name][0][key], want), (name, key)
        assert all(torch.equal(a, b) for a, b in zip(res[name][3], res["plain"][3]))
        for g, ref in zip(res[name][1], res["plain"][1]):
            assert (g is None and ref is None) or torch.allclose(g, ref, rtol=1e-5, atol=1e-7)


def _graph(loss: torch.Tensor) -> list:
    seen, stack = set(), [loss.grad_fn]
    while stack:
        f = stack.pop()
        if f is not None and f not in seen:
            seen.add(f)
            stack.extend(n for n, _ in f.next_functions)
    return list(seen)


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2", "qwen3"])
@pytest.mark.parametrize("stage", ["base", "warmup", "sparse"])
def test_step_graph_has_no_slice_backward(family, stage):
    """Tensors cut in parts (queries into no-RoPE and RoPE dims, keys from values, the hidden states into the LM
    head's chunks) are split, not sliced: a slice's backward writes a zero-filled tensor of the whole input's size
    per part and the parts' gradients are then added (about 50 ms of the 64K V3-shaped step's profile)."""
    arch = tiny(family)
    model = build_model(ModelConfig(arch=arch, **TINY_INDEX))
    model.activation_checkpointing = False
    ids = torch.randint(0, arch["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(0))
    loss, _ = compute_loss(model, STAGES[stage], StageConfig(name=stage), ids, torch.roll(ids, -1, 1))
    sliced = sorted({type(f).__name__ for f in _graph(loss) if "Slice" in type(f).__name__})
    assert sliced == [], sliced
