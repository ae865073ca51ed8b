"""The chunked reference ops (the twins) against the naive full-matrix formulas beside them in reference.py (small
shapes only), forward and backward."""

import pytest
import torch

from train import ops
from train.ops import reference

B, L, H, G, D, DI = 2, 37, 3, 4, 12, 8  # odd L so that query blocks end mid-sequence


def _rand(*shape, seed, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).requires_grad_()


def _grads(out, inputs):
    return torch.autograd.grad(out, inputs)


@pytest.mark.parametrize("block_elems", [64, 1 << 22])  # many blocks, and one block
def test_sparse_mla_equals_dense_attention_masked_to_the_selection(block_elems):
    V, K = 8, 9
    q, kv = _rand(B, L, H, D, seed=0), _rand(B, L, D, seed=1)
    idx = ops.indexer_topk(_rand(B, L, G, DI, seed=2), _rand(B, L, DI, seed=3), _rand(B, L, G, seed=4), K)
    out, p, _ = reference.sparse_mla(q, kv, idx, 0.3, V, block_elems=block_elems)

    want, probs = reference.naive_sparse_attention(q, kv[:, :, None], kv[:, :, None, :V], idx, 0.3)
    assert (out - want).abs().max().item() <= 1e-5
    assert (p - probs.mean(1).gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, 0)).abs().max() <= 1e-6

    g = torch.randn_like(out)
    got_dq, got_dkv = _grads((out * g).sum(), [q, kv])
    want_dq, want_dkv = _grads((want * g).sum(), [q, kv])
    assert (got_dq - want_dq).abs().max().item() <= 1e-5
    assert (got_dkv - want_dkv).abs().max().item() <= 1e-5


@pytest.mark.parametrize("block_elems", [64, 1 << 22])
@pytest.mark.parametrize("H_, J", [(6, 2), (3, 3), (4, 1)])  # GQA, MHA, MQA
def test_sparse_gqa_equals_dense_attention_masked_to_the_selection(block_elems, H_, J):
    V, K = 10, 9
    q, k, v = _rand(B, L, H_, D, seed=0), _rand(B, L, J, D, seed=1), _rand(B, L, J, V, seed=2)
    idx = ops.indexer_topk(_rand(B, L, G, DI, seed=3), _rand(B, L, DI, seed=4), _rand(B, L, G, seed=5), K)
    idx[1, L // 2] = -1  # a query with no selection: zero output, zero gradients
    out, p, lse = reference.sparse_gqa(q, k, v, idx, 0.3, block_elems=block_elems)

    want, probs = reference.naive_sparse_attention(q, k, v, idx, 0.3)
    selected = torch.zeros(B, L, L).scatter_add_(-1, idx.clamp(min=0), (idx >= 0).float()) > 0
    assert (out - want).abs().max().item() <= 1e-5
    assert (p - probs.mean(1).gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, 0)).abs().max() <= 1e-6
    scores = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(H_ // J, dim=2)) * 0.3
    want_lse = scores.masked_fill(~selected[:, None], float("-inf")).logsumexp(-1).transpose(1, 2)
    assert torch.isinf(lse[1, L // 2]).all() and (lse - want_lse)[lse.isfinite()].abs().max() <= 1e-5

    g = torch.randn_like(out)
    got = _grads((out * g).sum(), [q, k, v])
    want_g = _grads((want * g).sum(), [q, k, v])
    for a, b in zip(got, want_g):
        assert (a - b).abs().max().item() <= 1e-5


def test_dense_indexer_kl_over_grouped_keys_equals_it_over_repeated_keys():
    """GQA's warm-up target: query head h reads key head h // (H / J); the same as MHA over repeated keys."""
    qi, ki, wi = _rand(B, L, G, DI, seed=5), _rand(B, L, DI, seed=6), _rand(B, L, G, seed=7)
    qa, ka = _rand(B, L, 6, D, seed=8), _rand(B, L, 2, D, seed=9)
    grouped = reference.dense_indexer_kl(qi, ki, wi, qa, ka, 0.4, topk=5, block_elems=64)
    repeated = reference.dense_indexer_kl(qi, ki, wi, qa, ka.repeat_interleave(3, dim=2), 0.4, topk=5)
    for a, b in zip(grouped, repeated):
        assert (a - b).abs().max().item() <= 1e-6


@pytest.mark.parametrize("block_elems", [64, 1 << 22])
def test_dense_indexer_kl_matches_formula_and_gradient(block_elems):
    qi, ki, wi = _rand(B, L, G, DI, seed=5), _rand(B, L, DI, seed=6), _rand(B, L, G, seed=7)
    qa, ka = _rand(B, L, H, D, seed=8), _rand(B, L, H, D, seed=9)
    kl, recall = reference.dense_indexer_kl(qi, ki, wi, qa, ka, 0.4, topk=5, block_elems=block_elems)

    causal = torch.ones(L, L, dtype=torch.bool).tril()
    p = reference.naive_head_summed_attention(qa, ka, 0.4)
    want = reference.naive_kl(p, reference.naive_indexer_logits(qi, ki, wi), causal.expand(B, L, L))
    assert (kl - want).abs().max().item() <= 1e-5
    top = torch.sort(reference.naive_indexer_logits(qi, ki, wi), dim=-1, descending=True, stable=True).indices[..., :5]
    assert (recall - p.gather(-1, top).sum(-1)).abs().max().item() <= 1e-5
    assert torch.all(recall[:, :5] > 1 - 1e-6), "a query with <= k causal tokens selects all of them"

    # dL/dI = softmax(I) - p: check the chain through I's inputs against autograd on the naive formula.
    got = _grads(kl.sum(), [qi, ki, wi])
    want_g = _grads(want.sum(), [qi, ki, wi])
    for a, b in zip(got, want_g):
        assert (a - b).abs().max().item() <= 1e-5
    kl_again, _ = reference.dense_indexer_kl(qi, ki, wi, qa, ka, 0.4, topk=5, block_elems=block_elems)
    no_grad = torch.autograd.grad(kl_again.sum(), [qa, ka], allow_unused=True)
    assert no_grad == (None, None), "no gradient to the attention inputs (the target is a constant)"


@pytest.mark.parametrize("block_elems", [64, 1 << 22])
def test_sparse_indexer_kl_over_selected_set(block_elems):
    K = 6
    qi, ki, wi = _rand(B, L, G, DI, seed=10), _rand(B, L, DI, seed=11), _rand(B, L, G, seed=12)
    idx = ops.indexer_topk(qi.detach(), ki.detach(), wi.detach(), K)
    p = torch.rand(B, L, K, generator=torch.Generator().manual_seed(13)).masked_fill(idx < 0, 0)
    p = p / p.sum(-1, keepdim=True)
    kl = reference.sparse_indexer_kl(qi, ki, wi, idx, p, block_elems=block_elems)

    full = reference.naive_indexer_logits(qi, ki, wi)
    sel = full.gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, float("-inf"))
    want = reference.naive_kl(p, sel, idx >= 0)
    assert (kl - want).abs().max().item() <= 1e-5
    for a, b in zip(_grads(kl.sum(), [qi, ki, wi]), _grads(want.sum(), [qi, ki, wi])):
        assert (a - b).abs().max().item() <= 1e-5


def test_topk_pads_short_rows_with_minus_one():
    idx = ops.indexer_topk(_rand(1, L, G, DI, seed=1), _rand(1, L, DI, seed=2), _rand(1, L, G, seed=3), 10)
    assert idx.shape == (1, L, 10)
    for t in range(L):
        row = idx[0, t]
        assert (row >= 0).sum().item() == min(10, t + 1)
        assert row.max().item() <= t


def test_fp8_indexer_twin_is_deepseeks_quantised_formula():
    """The FP8 indexer's top-k against its definition written out: q and k rotated by the orthonormal Hadamard
    matrix (H[i, j] = (-1)^popcount(i & j) / sqrt(D)), each vector in e4m3 with the power-of-two scale
    2^ceil(log2(amax / 448)), and the logits of the dequantised vectors."""
    B, L, G, D, K = 2, 40, 3, 32, 8
    g = torch.Generator().manual_seed(11)
    q, k = torch.randn(B, L, G, D, generator=g), torch.randn(B, L, D, generator=g) * 5
    w = torch.randn(B, L, G, generator=g)
    i = torch.arange(D)
    bits = (i[:, None] & i[None, :]).tolist()
    h = torch.tensor([[(-1.0) ** bin(x).count("1") for x in row] for row in bits]) / D**0.5

    def dequantised(x):
        x = x @ h
        scale = 2.0 ** torch.ceil(torch.log2(x.abs().amax(-1, keepdim=True) / 448))
        assert ((x / scale).abs().amax(-1) > 224).all() and ((x / scale).abs().amax(-1) <= 448).all()
        return (x / scale).to(torch.float8_e4m3fn).float() * scale

    logits = reference.naive_indexer_logits(dequantised(q), dequantised(k), w)
    vals, want = reference.topk_stable(logits, K)
    want = want.masked_fill(vals == float("-inf"), -1)
    assert torch.equal(reference.indexer_topk_fp8(q, k, w, K, block_elems=300), want)
    # the rotation alone changes no logit (it is orthonormal); the e4m3 rounding changes some
    exact = reference.naive_indexer_logits(q, k, w)
    torch.testing.assert_close(reference.naive_indexer_logits(q @ h, k @ h, w), exact, rtol=1e-4, atol=1e-4)
    assert not torch.equal(logits, exact)


def test_fp8_top_k_dispatch(monkeypatch):
    """`model.index_dtype`: fp8 anywhere (the twin off the GPU), bf16, or auto (fp8 on Hopper GPUs only)."""
    monkeypatch.setenv("DSA_KERNELS", "reference")
    g = torch.Generator().manual_seed(12)
    q, k, w = torch.randn(1, 50, 2, 16, generator=g), torch.randn(1, 50, 16, generator=g), torch.rand(1, 50, 2)
    assert torch.equal(ops.indexer_topk(q, k, w, 8, index_dtype="fp8"), reference.indexer_topk_fp8(q, k, w, 8))
    assert torch.equal(ops.indexer_topk(q, k, w, 8, index_dtype="auto"), reference.indexer_topk(q, k, w, 8))
    assert not ops.index_fp8("auto", q) and ops.index_fp8("fp8", q) and not ops.index_fp8("bf16", q)
    with pytest.raises(ValueError, match="model.index_dtype='e5m2'; allowed: auto, fp8, bf16"):
        ops.indexer_topk(q, k, w, 8, index_dtype="e5m2")
