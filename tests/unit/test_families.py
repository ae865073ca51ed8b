"""Sources beyond DeepSeek-V3: GQA / MHA families and MLA without a query latent. Parity with the source in dense
mode, and the `dsa` export against the model itself in transformers (trust_remote_code), dense and sparse, with
ties at the top-k boundary; generation with and without the cache; the export as a source again."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import perturb_, tiny, tiny_source
from train.model import AttentionMode, ModelConfig, build_model, convert_to_dsa
from train.export import export_hf
from train.model.hf import own_export

FAMILIES = {family: tiny(family, num_hidden_layers=2, max_position_embeddings=512)
            for family in ("qwen3", "llama", "qwen2", "mistral", "deepseek_v2")}


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_mode_matches_the_source(family):
    arch = FAMILIES[family]
    source = tiny_source(arch)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = source(ids, use_cache=False).logits
        model = convert_to_dsa(source, ModelConfig(arch=arch, index_n_heads=2, index_topk=8)).eval()
        got = model(ids, AttentionMode(sparse=False))
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_dsa_export_loads_in_transformers_and_matches_the_model(family, tmp_path):
    arch = FAMILIES[family]
    # One indexer head: a key whose score relu clips to 0 ties with every other such key, so ties sit at the top-k
    # boundary of many rows; the export must break them as training does (the lower position wins).
    model = convert_to_dsa(tiny_source(arch), ModelConfig(arch=arch, index_n_heads=1, index_topk=8)).eval()
    perturb_(model, seed=3)
    L, k = 48, 8
    ids = torch.randint(0, 97, (2, L), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        sparse = model(ids, AttentionMode(sparse=True, topk=k))
        dense = model(ids, AttentionMode(sparse=False))
        layer = model.layers[0].self_attn
        layer_in = model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        cos, sin = model.model.rotary_emb(layer_in, torch.arange(L)[None])
        q, kk, w = layer.indexer(layer_in, layer_in, cos, sin)
        from train.ops import reference

        logits = reference.indexer_logits(q, kk, w, 0)
        kth = logits.sort(dim=-1, descending=True).values[..., k - 1 : k]
        ties = ((logits == kth).sum(-1) > 1) & (torch.arange(L) >= k)
    assert ties.any(), "the test needs ties at the top-k boundary"
    assert (sparse - dense).abs().max().item() > 1e-2, "selection must drop tokens at L > k"

    out = export_hf(model, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "dsa" and config["source_model_type"] == family
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_dsa.DSAForCausalLM"
    assert own_export(out) and not own_export(tmp_path)  # what the tokenizer loaders trust (no prompt)
    hf, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32,
                                                    output_loading_info=True)
    assert type(hf).__name__ == "DSAForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert (hf.eval()(ids).logits - sparse).abs().max().item() <= 1e-4
        hf.config.index_topk = L  # every query keeps all its tokens: dense attention
        for m in hf.modules():
            if type(m).__name__ == "DSAIndexer":
                m.topk = L
        assert (hf(ids).logits - dense).abs().max().item() <= 1e-4
        for m in hf.modules():
            if type(m).__name__ == "DSAIndexer":
                m.topk = k
        prompt = ids[:1, :12]  # greedy generation past k tokens: the cached indexer keys must match a fresh run
        cached = hf.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
        fresh = hf.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, fresh)

    # The export is a source again (the sparse stage starts from the warm-up's): the indexers come back.
    again = build_model(ModelConfig(path=str(out), index_topk=k)).eval()
    with torch.no_grad():
        assert torch.equal(again(ids, AttentionMode(sparse=True, topk=k)), sparse)


def test_selection_probe_orders_its_recalls():
    """bench.selection: a group's own top-k keeps at least as much of its attention as the shared one, and the
    head-summed attention's own top-k at least as much as the indexer's."""
    from bench.selection import group_recalls

    arch = FAMILIES["qwen3"]
    model = convert_to_dsa(tiny_source(arch), ModelConfig(arch=arch, index_n_heads=2, index_topk=8)).eval()
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(4))
    rows = group_recalls(model, ids, 8, with_indexer=True)
    assert len(rows) == arch["num_hidden_layers"]
    for r in rows:
        assert 0 < r["shared_indexer"] <= r["shared_oracle"] + 1e-6 <= r["group_oracle"] + 2e-6 <= 1 + 3e-6
    assert any(r["shared_oracle"] < r["group_oracle"] - 1e-3 for r in rows), "groups attend differently"
