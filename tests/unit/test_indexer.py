"""The indexer's logits against the formula of docs/design.md (The indexer), written out independently here."""

import torch

from tests.conftest import TINY_INDEX, perturb_
from train import ops
from train.model import ModelConfig, build_model


def _setup(tiny_arch, L=40):
    model = build_model(ModelConfig(arch=tiny_arch, **TINY_INDEX)).eval()
    perturb_(model, seed=5)
    attn = model.layers[1].self_attn
    with torch.no_grad():  # logits of O(1), so that 1e-5 agreement means something
        attn.indexer.wq_b.weight.mul_(5)
        attn.indexer.weights_proj.weight.mul_(5)
    x = torch.randn(2, L, tiny_arch["hidden_size"], generator=torch.Generator().manual_seed(3))
    cos, sin = model.model.rotary_emb(x, torch.arange(L)[None])
    return model, attn, x, cos, sin


def _formula(attn, x, inv_freq, rope_dim):
    """I[t,s] = sum_j w[t,j] * D**-0.5 * relu(q[t,j] . k[s]), w = weights_proj(x) * G**-0.5, NeoX RoPE on [:R]."""
    idx = attn.indexer
    G, D = idx.num_heads, idx.head_dim
    B, L, _ = x.shape
    qr = attn.q_a_layernorm(x @ attn.q_a_proj.weight.T)
    q = (qr @ idx.wq_b.weight.T).view(B, L, G, D)
    k = torch.nn.functional.layer_norm(x @ idx.wk.weight.T, (D,), idx.k_norm.weight, idx.k_norm.bias, 1e-6)
    angle = torch.arange(L, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [L, R/2]
    rot = torch.polar(torch.ones_like(angle), angle)

    def rope(v):  # pairs (i, i + R/2) as one complex number
        half = rope_dim // 2
        z = torch.complex(v[..., :half], v[..., half:rope_dim])
        z = z * (rot if v.ndim == 3 else rot[:, None, :])
        return torch.cat((z.real, z.imag, v[..., rope_dim:]), dim=-1)

    q, k = rope(q), rope(k)
    w = (x @ idx.weights_proj.weight.T) * G**-0.5
    logits = torch.zeros(B, L, L)
    for j in range(G):
        logits += w[:, :, j, None] * D**-0.5 * torch.relu(torch.einsum("btd,bsd->bts", q[:, :, j], k))
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf"))


def test_indexer_logits_match_formula(tiny_arch):
    model, attn, x, cos, sin = _setup(tiny_arch)
    with torch.no_grad():
        qr = attn.q_a_layernorm(attn.q_a_proj(x))
        q, k, w = attn.indexer(x, qr, cos, sin)
        got = ops.indexer_logits(q, k, w, t0=0)
        want = _formula(attn, x, model.model.rotary_emb.inv_freq, tiny_arch["qk_rope_head_dim"])
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    assert (got[finite] - want[finite]).abs().max().item() <= 1e-5
    assert want[finite].std() > 0.2  # the scores are not degenerate


def test_topk_matches_full_sort_and_layout_is_pinned(tiny_arch):
    model, attn, x, cos, sin = _setup(tiny_arch, L=64)
    k = TINY_INDEX["index_topk"]
    with torch.no_grad():
        qr = attn.q_a_layernorm(attn.q_a_proj(x))
        q, kk, w = attn.indexer(x, qr, cos, sin)
        top = ops.indexer_topk(q, kk, w, k)
        full = ops.indexer_logits(q, kk, w, t0=0)
        q_i, k_i, w_i = attn.indexer(x, qr, cos, sin, interleaved=True)
        top_interleaved = ops.indexer_topk(q_i, k_i, w_i, k)
    L = x.shape[1]
    for t in range(L):
        want = set(torch.sort(full[0, t], descending=True, stable=True).indices[: min(k, t + 1)].tolist())
        assert set(top[0, t][top[0, t] >= 0].tolist()) == want
        assert (top[0, t] >= 0).sum().item() == min(k, t + 1)
    differ = sum(set(top[b, t].tolist()) != set(top_interleaved[b, t].tolist()) for b in range(2) for t in range(k, L))
    assert differ > 0.25 * 2 * (L - k), f"interleaved RoPE changed only {differ} top-k sets"


def test_fp8_index_dtype_selects_with_the_fp8_logits_and_trains_the_weights(tiny_arch):
    """model.index_dtype=fp8: the sparse stage's selection is the FP8 indexer's top-k of the layer's own indexer
    outputs, and its KL still gives the (full-precision) indexer weights their gradients."""
    from train.model import AttentionMode

    model = build_model(ModelConfig(arch=tiny_arch, index_dtype="fp8", **TINY_INDEX))
    perturb_(model, seed=6)
    attn = model.layers[1].self_attn
    assert attn.indexer.index_dtype == "fp8"
    ids = torch.randint(0, tiny_arch["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(4))
    captured = {}
    hook = attn.indexer.register_forward_hook(lambda m, args, out: captured.update(out=out))
    model(ids, AttentionMode(sparse=True, indexer_loss=True, keep_topk=True))
    hook.remove()
    q, k, w = (t.detach() for t in captured["out"])
    k_ = TINY_INDEX["index_topk"]
    assert torch.equal(attn.stats.topk_BLK, ops.indexer_topk(q, k, w, k_, index_dtype="fp8"))
    sum(layer.self_attn.stats.kl_BL.sum() for layer in model.layers).backward()
    assert attn.indexer.wq_b.weight.grad.abs().sum() > 0 and attn.indexer.wk.weight.grad.abs().sum() > 0


def test_index_dtype_is_checked():
    import pytest

    with pytest.raises(ValueError, match="model.index_dtype='fp16'; allowed: auto, fp8, bf16"):
        ModelConfig(path="x", index_dtype="fp16").validate()


def test_eval_takes_the_runs_index_dtype(tmp_path):
    """`make eval` selects as the run trained: the index_dtype of the run's config.yaml beside the export."""
    from omegaconf import OmegaConf

    from train.evaluation import run_settings

    OmegaConf.save({"data": {"seq_len": 64}, "model": {"index_dtype": "fp8"}}, tmp_path / "config.yaml")
    assert run_settings(str(tmp_path / "export"), None) == {"seq_len": 64, "index_dtype": "fp8"}
