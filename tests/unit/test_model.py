"""Model surgery and attention modes: parity with transformers' DeepseekV3 / DeepseekV32 models."""

import json

import pytest
import torch
from transformers import DeepseekV32ForCausalLM

from tests.conftest import TINY_INDEX, perturb_, tiny_source
from train.model import AttentionMode, ModelConfig, build_model, convert_to_dsa
from train.export import export_hf, v32_config


_source = tiny_source  # a DeepseekV3ForCausalLM of `tiny_arch` (no model_type: DeepSeek-V3)


@pytest.mark.parametrize("mlp", ["moe", "dense"])
def test_dense_mode_matches_deepseek_v3(tiny_arch, mlp):
    if mlp == "dense":
        tiny_arch["first_k_dense_replace"] = tiny_arch["num_hidden_layers"]
    source = _source(tiny_arch)
    ids = torch.randint(0, tiny_arch["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = source(ids, use_cache=False).logits
        model = convert_to_dsa(source, ModelConfig(arch=tiny_arch, **TINY_INDEX)).eval()
        got = model(ids, AttentionMode(sparse=False))
    assert (got - want).abs().max().item() <= 1e-5


def test_export_loads_in_transformers_and_matches_sparse_mode(tiny_arch, tmp_path):
    # 16 indexer heads: an exact tie (every head's relu at 0) is then too rare to meet the top-k boundary,
    # where transformers' torch.topk and our lower-position-wins rule could pick differently.
    index = TINY_INDEX | {"index_n_heads": 16}
    model = convert_to_dsa(_source(tiny_arch), ModelConfig(arch=tiny_arch, **index)).eval()
    perturb_(model, seed=3)  # indexers off their fresh init too
    L, k = 48, TINY_INDEX["index_topk"]
    ids = torch.randint(0, tiny_arch["vocab_size"], (2, L), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        sparse = model(ids, AttentionMode(sparse=True, topk=k))
        dense = model(ids, AttentionMode(sparse=False))
    assert (sparse - dense).abs().max().item() > 1e-2, "selection must drop tokens at L > k"

    out = export_hf(model, tmp_path / "export")
    assert not list(tmp_path.glob(".export.tmp-*")), "no temporary directory left behind"
    v32, info = DeepseekV32ForCausalLM.from_pretrained(
        out, attn_implementation="eager", dtype=torch.float32, output_loading_info=True
    )
    assert v32.config.model_type == "deepseek_v32"
    assert (v32.config.index_n_heads, v32.config.index_head_dim, v32.config.index_topk) == (16, 16, k)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        hf_logits = v32.eval()(ids, use_cache=False).logits
    assert (hf_logits - sparse).abs().max().item() <= 1e-4

    # The export is also a valid source: reloading it keeps the trained indexers (a deepseek_v32 source).
    reloaded = build_model(ModelConfig(path=str(out), index_topk=k)).eval()
    with torch.no_grad():
        again = reloaded(ids, AttentionMode(sparse=True, topk=k))
    assert torch.equal(again, sparse)


def test_export_keeps_backbone_bit_identical(tiny_arch, tmp_path):
    source = _source(tiny_arch)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    model = convert_to_dsa(source, ModelConfig(arch=tiny_arch, **TINY_INDEX))
    v32 = DeepseekV32ForCausalLM.from_pretrained(export_hf(model, tmp_path / "e"), dtype=torch.float32)
    after = v32.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert sum(".indexer." in k for k in after) == 5 * tiny_arch["num_hidden_layers"]


def test_build_from_arch_is_deterministic(tiny_arch):
    cfg = ModelConfig(arch=tiny_arch, **TINY_INDEX, init_seed=7)
    a, b = build_model(cfg), build_model(ModelConfig(arch=tiny_arch, **TINY_INDEX, init_seed=7))
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def test_streamed_export_equals_save_pretrained_in_shards(tiny_arch, tmp_path):
    """The export writes group by group, in shards, through transformers' reverse conversion: the tensors on
    disk are exactly what `save_pretrained` writes for the same weights, and the sharded directory loads."""
    from safetensors.torch import load_file

    from train.export import layer_groups

    model = convert_to_dsa(_source(tiny_arch), ModelConfig(arch=tiny_arch, **TINY_INDEX))
    perturb_(model, seed=5)
    keys = list(model.state_dict())
    groups = layer_groups(keys)
    assert sorted(k for g in groups for k in g) == sorted(keys)
    layer_ids = [{k.split(".")[2] for k in g if k.startswith("model.layers.")} for g in groups]
    assert all(len(ids) <= 1 for ids in layer_ids)  # never two layers in one group
    assert sum(len(ids) == 1 for ids in layer_ids) == tiny_arch["num_hidden_layers"]

    out = export_hf(model, tmp_path / "streamed", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    streamed = {k: v for f in files for k, v in load_file(out / f).items()}

    with torch.device("meta"):
        ref = DeepseekV32ForCausalLM(v32_config(model.source_config, model.index_n_heads, model.index_head_dim,
                                                model.index_topk))
    ref.load_state_dict(model.state_dict(), assign=True)
    ref.save_pretrained(tmp_path / "reference")
    reference = load_file(tmp_path / "reference" / "model.safetensors")
    assert streamed.keys() == reference.keys() and any(".experts.0.gate_proj." in k for k in streamed)
    assert all(torch.equal(streamed[k], reference[k]) for k in reference)
    v32 = DeepseekV32ForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert all(torch.equal(v32.state_dict()[k], v) for k, v in model.state_dict().items())


def test_parity_with_transformers_when_top_k_ties(tiny_arch, tmp_path):
    """ReLU makes exact ties common (a score clipped to 0 in every head); at the k-th place they are broken by the
    lower position here and by torch.topk in transformers. With ties forced (one indexer head weighted -0.05 for
    every token, so every clipped score is the row's maximum, 0): in layer 0, which both models see the same
    input for, the two selections hold the same multiset of logits (they differ only among exact ties) and do
    differ; positions with at most k tokens (everything selected) agree to 1e-4; the loss agrees within the
    bound measured here (0.0013 nats on this model; pinned at 0.01)."""
    import torch.nn.functional as F

    from train.ops import reference

    index = TINY_INDEX | {"index_n_heads": 2}
    model = convert_to_dsa(_source(tiny_arch), ModelConfig(arch=tiny_arch, **index)).eval()
    perturb_(model, seed=3)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.indexer.weights_proj.weight[0] = -0.05
    L, k = 48, TINY_INDEX["index_topk"]
    ids = torch.randint(0, tiny_arch["vocab_size"], (2, L), generator=torch.Generator().manual_seed(2))
    captured = []
    hook = model.layers[0].self_attn.indexer.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        ours = model(ids, AttentionMode(sparse=True, keep_topk=True))
    hook.remove()
    ours_BLK = model.layer_stats()[0].topk_BLK.clamp(min=0)  # -1 (none) only in rows shorter than k

    v32 = DeepseekV32ForCausalLM.from_pretrained(export_hf(model, tmp_path / "e"), attn_implementation="eager",
                                                 dtype=torch.float32).eval()
    theirs_sel = []
    v32.model.layers[0].self_attn.indexer.register_forward_hook(lambda m, i, o: theirs_sel.append(o.long()))
    with torch.no_grad():
        theirs = v32(ids, use_cache=False).logits
    theirs_BLK = theirs_sel[0]

    logits_BLS = reference.indexer_logits(*captured[0], 0)
    full = slice(k - 1, L)  # rows with at least k causal tokens
    got = logits_BLS.gather(-1, ours_BLK)[:, full].sort(-1).values
    want = logits_BLS.gather(-1, theirs_BLK)[:, full].sort(-1).values
    assert torch.equal(got, want), "the selections may differ only among exactly tied logits"
    picked = [torch.zeros_like(logits_BLS, dtype=torch.bool).scatter(-1, s, True)[:, full] for s in
              (ours_BLK, theirs_BLK)]
    assert (picked[0] != picked[1]).any(-1).sum() >= 5, "the test must meet ties at the k-th place"

    assert (ours[:, :k] - theirs[:, :k]).abs().max().item() <= 1e-4
    labels = ids[:, 1:].flatten()
    ce = [F.cross_entropy(x[:, :-1].flatten(0, 1), labels).item() for x in (ours, theirs)]
    assert abs(ce[0] - ce[1]) <= 0.01, ce


def test_warmup_export_writes_the_source_backbone_whatever_the_compute_dtype(tiny_arch, tmp_path):
    """A float32 source trained in bf16: the model's backbone is rounded, but the export's backbone is the
    source's, bit for bit, in float32; the indexers are the model's."""
    from safetensors.torch import load_file

    source = _source(tiny_arch)
    source.save_pretrained(tmp_path / "src")
    model = build_model(ModelConfig(path=str(tmp_path / "src"), **TINY_INDEX)).to(torch.bfloat16)
    want = load_file(tmp_path / "src" / "model.safetensors")
    rounded = load_file(export_hf(model, tmp_path / "rounded", dtype=torch.float32) / "model.safetensors")
    assert any(not torch.equal(rounded[k], v) for k, v in want.items())
    got = load_file(export_hf(model, tmp_path / "e", dtype=torch.float32, backbone_from=tmp_path / "src")
                    / "model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in want.items())
    indexer = {k: v for k, v in model.state_dict().items() if ".indexer." in k}
    assert indexer and all(torch.equal(got[k], v.float()) for k, v in indexer.items())
