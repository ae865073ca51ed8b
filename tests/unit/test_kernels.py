"""Triton and TileLang kernels against their PyTorch twins (train/ops/reference.py).

On CPU the kernels run in Triton's interpreter on small shapes (tests/conftest.py sets TRITON_INTERPRET=1);
on a GPU the same tests also run DeepSeek-V3's shapes in bf16. Tolerances are max |kernel - twin| over
max |twin| per output: 1e-5 in the interpreter (fp32, exact dots); 5e-2 on a GPU, where tl.dot rounds
fp32 inputs to TF32 and, in bf16, the kernels cast P and dS to bf16 before their matmuls while the twin
computes in fp32 from the same bf16 inputs; relu masks (the indexer) flip where q.k is near 0, which
moves single gradient entries. Forward outputs agree far closer (docs/benchmarks.md gives the relative differences
measured on the GPU).
"""

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

from tests.conftest import tiny  # noqa: E402
from train.ops.autograd import ComposedSparseMLA  # noqa: E402
from train.ops import (  # noqa: E402
    common,
    cudnn_sparse_mla,
    cudnn_topk,
    flashmla_sparse_mla,
    reference,
    triton_sparse_gqa,
    triton_sparse_mla,
    triton_topk,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = pytest.mark.skipif(DEVICE != "cuda", reason="real shapes need a GPU")


def _tilelang_kernels():
    if DEVICE != "cuda" or not common.is_hopper(torch.device("cuda")):
        return None
    try:
        from train.ops import tilelang_sparse_mla
    except ImportError:
        return None
    return tilelang_sparse_mla


tilelang_sparse_mla = _tilelang_kernels()
TILELANG = pytest.mark.skipif(tilelang_sparse_mla is None, reason="TileLang kernels need a Hopper GPU and tilelang")
FLASHMLA = pytest.mark.skipif(tilelang_sparse_mla is None or not flashmla_sparse_mla.importable(),
                              reason="FlashMLA's sparse forward needs a Hopper GPU and sgl-flash-mla")
CUDNN = pytest.mark.skipif(tilelang_sparse_mla is None or not cudnn_sparse_mla.importable(),
                           reason="cuDNN's sparse MLA backward needs a Hopper GPU and nvidia-cudnn-frontend")
CUDNN_TOPK = pytest.mark.skipif(DEVICE != "cuda" or not cudnn_topk.fits(torch.zeros(1, device=DEVICE))
                                or not cudnn_topk.importable(),
                                reason="cuDNN's top-k needs a Hopper GPU and nvidia-cudnn-frontend")
TOL = 1e-5 if DEVICE == "cpu" else 5e-2      # gradients
TOL_FWD = 1e-5 if DEVICE == "cpu" else 1e-2  # forward outputs (loss, attention output, probabilities, recall)
# Gradients that sum many heads' and queries' bf16 contributions by fp32 atomics (in another order each run): the
# latent rows' at DeepSeek's shape (TileLang's backward: 5.05e-2 of the largest entry on an H100) and, as the
# forward outputs and dq stayed under 6e-3, those of cuDNN's backward and of sparse GQA's key and value heads at
# Qwen3's shape, past 5e-2 in some of five runs (H100, 2026-12-07; the messages were cut short, and now name the
# worst first).
TOL_SUMMED = max(TOL, 6e-2)


def _assert_close(got, want, names, n_fwd, tol, tol_fwd=TOL_FWD):
    """Each output's largest error over its largest entry: the first n_fwd within tol_fwd, all within tol; the
    message names the worst of each kind first (pytest shortens long dicts)."""
    errs = {n: (a.float() - b.float()).abs().max().item() / b.float().abs().max().item()
            for a, b, n in zip(got, want, names)}
    fwd = max(names[:n_fwd], key=errs.get)
    worst = max(errs, key=errs.get)
    assert errs[fwd] <= tol_fwd and errs[worst] <= tol, (f"worst forward {fwd} {errs[fwd]:.4g} (<= {tol_fwd}), "
                                                          f"worst {worst} {errs[worst]:.4g} (<= {tol})", errs)
    return errs


def _exact_indexer_inputs(B, L, G, D, seed=0):
    """Small integers and power-of-two weights: every logit is exact in fp32, whatever the summation order,
    so the kernel's selection must equal the twin's index for index, ties included."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (B, L, G, D), generator=g).float()
    k = torch.randint(-2, 3, (B, L, D), generator=g).float()
    w = 2.0 ** torch.randint(-3, 2, (B, L, G), generator=g).float()
    w = w * torch.where(torch.rand(B, L, G, generator=g) < 0.3, -1.0, 1.0)
    return q.to(DEVICE), k.to(DEVICE), w.to(DEVICE)


@pytest.mark.parametrize("L, topk", [(300, 32), (20, 32), (64, 64)])
def test_topk_kernel_equals_twin_exactly(L, topk):
    q, k, w = _exact_indexer_inputs(2, L, 4, 16)
    want = reference.indexer_topk(q, k, w, topk)
    got = triton_topk.indexer_topk(q, k, w, topk)
    assert got.shape == want.shape and torch.equal(got, want)
    assert (got[:, : min(topk, L) - 1, -1] == -1).all()  # early rows see fewer than k keys


@pytest.mark.parametrize("fp8", [False, True])
def test_topk_of_query_pieces_at_their_offsets_equals_the_whole_sequence(fp8):
    """Context parallelism's zig-zag pieces (queries at an offset, all keys): kernel and twin give the rows of the
    whole-sequence selection, the first piece's rows with fewer than k keys included; in FP8 too (scales are per
    token, so a piece quantises its queries and the keys as the whole sequence does)."""
    from train.model.context import ContextParallel

    D = 32 if fp8 else 16  # e4m3 tiles take 32 dims at least
    q, k, w = _exact_indexer_inputs(2, 96, 4, D, seed=3)
    twin = reference.indexer_topk_fp8 if fp8 else reference.indexer_topk
    whole = twin(q, k, w, 32)
    for rank in range(2):
        for lo, g, n in ContextParallel(rank=rank, size=2).chunks(96):
            piece = (q[:, g : g + n], k, w[:, g : g + n], 32)
            assert torch.equal(twin(*piece, q_offset=g), whole[:, g : g + n])
            if DEVICE == "cpu" or not fp8:  # a GPU's FP8 sums may swap near-ties (tested above)
                assert torch.equal(triton_topk.indexer_topk(*piece, q_offset=g, fp8=fp8), whole[:, g : g + n])


@pytest.mark.parametrize("BS", [16, 1024])  # several blocks of the row scan, and one
def test_top_keys_take_ties_in_position_order(BS):
    q, k, w = _exact_indexer_inputs(2, 90, 4, 16, seed=2)
    logits = reference.indexer_logits(q, k, w, 0)
    assert (logits == 0).sum() > 100  # relu clips whole rows of heads: many exact ties
    keys = triton_topk.top_keys(triton_topk.logit_keys(q, k, w, t0=0), 40, BS=BS)
    top = torch.sort(keys, dim=-1, descending=True).values
    vals, pos = reference.topk_stable(logits, 40)
    kth = vals[..., -1:]
    assert ((logits == kth).sum(-1) > (vals == kth).sum(-1)).any()  # ties straddle the threshold: the rule matters
    assert torch.equal(4294967295 - (top & 0xFFFFFFFF), pos)
    assert torch.equal(triton_topk.decode_keys((top >> 32).to(torch.int32)), vals)


def test_logit_keys_decode_to_the_twin_logits():
    q, k, w = _exact_indexer_inputs(1, 70, 4, 16, seed=1)
    keys = triton_topk.logit_keys(q, k, w, t0=0)
    assert keys.dtype == torch.int32
    assert torch.equal(triton_topk.decode_keys(keys), reference.indexer_logits(q, k, w, 0))


def test_raw_logits_are_the_twin_logits():
    q, k, w = _exact_indexer_inputs(1, 70, 4, 16, seed=1)
    logits = triton_topk.logit_keys(q, k, w, t0=0, raw=True)
    assert logits.dtype == torch.float32 and torch.equal(logits, reference.indexer_logits(q, k, w, 0))


def _flat_twin_top_k(values, seq_lens, top_k, return_val=True, tie_break=0):
    """cuDNN's `indexer_top_k_wrapper` contract, computed by the twin's rule: row r's top_k largest of its first
    seq_lens[r] values, ties to the smaller column (tie_break=1), in a shuffled order, -1 past a short row."""
    assert tie_break == 1 and not return_val and values.dtype == torch.float32 and seq_lens.dtype == torch.int32
    cols = torch.arange(values.shape[-1], device=values.device)
    masked = values.masked_fill(cols[None] >= seq_lens[:, None].long(), float("-inf"))
    vals, pos = reference.topk_stable(masked, top_k)
    pos = pos.masked_fill(vals == float("-inf"), -1)
    perm = torch.rand(pos.shape, generator=torch.Generator().manual_seed(1)).argsort(-1).to(pos.device)
    return {"indices": pos.gather(-1, perm).to(torch.int32)}


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("L, topk, q_offset", [(300, 32, 0), (20, 32, 0), (300, 32, 200), (300, 40, 200)])
def test_topk_with_a_selection_in_any_order_equals_twin_exactly(fp8, L, topk, q_offset, monkeypatch):
    """The top-k with its selection from cuDNN's adapter (each row's visible length, the batch laid out as rows),
    over a stand-in for cuDNN's kernel built from the twin's rule (positions in no order): `order` gives the twin's
    selection in its order, two sequences, ties and short rows included, at an offset too."""
    monkeypatch.setattr(cudnn_topk, "_top_k", lambda: _flat_twin_top_k)
    D = 32 if fp8 else 16
    q, k, w = _exact_indexer_inputs(2, L + q_offset, 4, D, seed=5)
    q, w = q[:, q_offset:], w[:, q_offset:]
    twin = reference.indexer_topk_fp8 if fp8 else reference.indexer_topk
    want = twin(q, k, w, topk, q_offset=q_offset)
    got = triton_topk.indexer_topk(q, k, w, topk, q_offset=q_offset, fp8=fp8, select=cudnn_topk.select)
    if DEVICE == "cpu" or not fp8:
        assert torch.equal(got, want)
    else:
        assert selection_overlap(got, want, L + q_offset) >= 0.995


@CUDNN_TOPK
@pytest.mark.parametrize("L, topk, q_offset", [(300, 32, 0), (20, 32, 0), (64, 64, 0), (600, 48, 300)])
def test_cudnn_selection_equals_twin_exactly(L, topk, q_offset):
    """cuDNN's radix selection on exact logits (many ties at the cut): the twin's positions, in its order."""
    q, k, w = _exact_indexer_inputs(2, L + q_offset, 4, 16, seed=6)
    q, w = q[:, q_offset:], w[:, q_offset:]
    want = reference.indexer_topk(q, k, w, topk, q_offset=q_offset)
    got = triton_topk.indexer_topk(q, k, w, topk, q_offset=q_offset, select=cudnn_topk.select)
    assert torch.equal(got, want)


@CUDNN_TOPK
@pytest.mark.parametrize("fp8", [False, True])
def test_cudnn_selection_equals_triton_deepseek_shape(fp8, monkeypatch):
    """At DeepSeek's indexer shape over several query blocks: the same selection as Triton's own take, and the one
    the dispatch point runs."""
    from train import ops

    L = 6144
    q, k, w = _fp8_indexer_inputs(1, L, 64, 128, torch.bfloat16)
    want = triton_topk.indexer_topk(q, k, w, 2048, fp8=fp8)
    calls = []
    select = cudnn_topk.select
    monkeypatch.setattr(cudnn_topk, "select", lambda *a: calls.append(1) or select(*a))
    got = ops.indexer_topk(q, k, w, 2048, index_dtype="fp8" if fp8 else "bf16")
    assert calls and torch.equal(got, want)


def selection_overlap(got: torch.Tensor, want: torch.Tensor, L: int) -> float:
    """Share of `want`'s valid selections (over all rows) that `got` also holds; -1 entries are none."""
    def member(idx):
        rows = torch.zeros(*idx.shape[:2], L + 1, dtype=torch.bool, device=idx.device)
        return rows.scatter_(-1, idx + 1, True)[..., 1:]  # column 0 takes the -1 entries

    a, b = member(got), member(want)
    return ((a & b).sum() / b.sum()).item()


def _fp8_indexer_inputs(B, L, G, D, dtype, seed=8):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, L, G, D, generator=g), torch.randn(B, L, D, generator=g)
    w = torch.randn(B, L, G, generator=g) * (G * D) ** -0.5
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), w.to(DEVICE)


@pytest.mark.parametrize("L, topk", [(300, 32), (130, 48)])
def test_fp8_topk_kernel_matches_twin(L, topk):
    """The FP8 indexer's top-k (e4m3 queries and keys with their scales): in the interpreter the kernel's fp32 sums
    of e4m3 products equal the twin's, index for index; on a GPU the tensor cores sum in another order, which may
    swap near-ties: 99.5% of the selections agree."""
    q, k, w = _fp8_indexer_inputs(2, L, 4, 32, torch.float32 if DEVICE == "cpu" else torch.bfloat16)
    want = reference.indexer_topk_fp8(q, k, w, topk)
    got = triton_topk.indexer_topk(q, k, w, topk, fp8=True)
    assert got.shape == want.shape
    if DEVICE == "cpu":
        assert torch.equal(got, want)
    else:
        assert selection_overlap(got, want, L) >= 0.995
    # what FP8 changes against bf16's logits: a few selections among near-ties
    assert 0.9 <= selection_overlap(got, reference.indexer_topk(q, k, w, topk), L) < 1


@GPU
def test_fp8_topk_kernel_matches_twin_deepseek_shape():
    L = 4096
    q, k, w = _fp8_indexer_inputs(1, L, 64, 128, torch.bfloat16)
    want = reference.indexer_topk_fp8(q, k, w, 2048)
    got = triton_topk.indexer_topk(q, k, w, 2048, fp8=True)
    assert selection_overlap(got, want, L) >= 0.995


def _sparse_inputs(B, L, H, DV, DR, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H, DV + DR, generator=g)
    kv = torch.randn(B, L, DV + DR, generator=g)
    scores = torch.rand(B, L, L, generator=g)
    causal = torch.ones(L, L).tril().bool()
    idx = scores.masked_fill(~causal, -1).topk(min(K, L), dim=-1)
    idx = idx.indices.masked_fill(idx.values < 0, -1)
    idx[:, L // 2] = -1  # a query with no selection: zero output, no NaN
    return (q.to(DEVICE, dtype).requires_grad_(), kv.to(DEVICE, dtype).requires_grad_(), idx.to(DEVICE))


def _check_sparse_mla(B, L, H, DV, DR, K, dtype, tol, kernel=None):
    q, kv, idx = _sparse_inputs(B, L, H, DV, DR, K, dtype)
    scale = (DV + DR) ** -0.5
    g = torch.randn(B, L, H, DV, device=DEVICE, dtype=dtype)

    def run(fn, lse=None):
        out, p, lse_out = fn(q, kv, idx, scale, DV, lse)
        dq, dkv = torch.autograd.grad(out, (q, kv), g)
        return out, p, lse_out, dq, dkv

    twin = run(reference.sparse_mla)
    kernel = kernel or triton_sparse_mla.sparse_mla
    # the kernel alone, and given the twin's log-sum-exp (one pass: the checkpoint recomputation's path)
    for got in (run(kernel), run(kernel, twin[2])):
        none = torch.isinf(twin[2])  # +inf: the query with no selection
        assert none.any() and torch.equal(torch.isinf(got[2]), none)
        got, want = [list(x) for x in (got, twin)]
        got[2], want[2] = got[2].masked_fill(none, 0.0), want[2].masked_fill(none, 0.0)
        _assert_close(got, want, ("out", "p", "lse", "dq", "dkv"), 3, tol)


@pytest.mark.parametrize("H", [16, 40])  # one head block (the small-H launch configuration); masked blocks
def test_sparse_mla_kernel_matches_twin_small(H):
    # fp32 inputs: exact on CPU; on a GPU tl.dot rounds fp32 inputs to TF32 (10-bit mantissa)
    _check_sparse_mla(B=2, L=40, H=H, DV=32, DR=16, K=24, dtype=torch.float32, tol=TOL)


@GPU
@pytest.mark.parametrize("H", [128, 16])  # DeepSeek-V3, and the 1B benchmark model
def test_sparse_mla_kernel_matches_twin_deepseek_shape(H):
    _check_sparse_mla(B=1, L=4096, H=H, DV=512, DR=64, K=2048, dtype=torch.bfloat16, tol=TOL)


def _check_sparse_gqa(B, L, H, J, D, K, dtype, tol):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, L, H, D, generator=g).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(B, L, J, D, generator=g).to(DEVICE, dtype).requires_grad_()
    v = torch.randn(B, L, J, D, generator=g).to(DEVICE, dtype).requires_grad_()
    idx = _sparse_inputs(B, L, 1, 16, 16, K, dtype)[2]
    grad = torch.randn(B, L, H, D, device=DEVICE, dtype=dtype)

    def run(fn, lse=None):
        out, p, lse_out = fn(q, k, v, idx, D**-0.5, lse)
        return (out, p, lse_out, *torch.autograd.grad(out, (q, k, v), grad))

    twin = run(reference.sparse_gqa)
    for got in (run(triton_sparse_gqa.sparse_gqa), run(triton_sparse_gqa.sparse_gqa, twin[2])):
        none = torch.isinf(twin[2])
        assert none.any() and torch.equal(torch.isinf(got[2]), none)
        got, want = [list(x) for x in (got, twin)]
        got[2], want[2] = got[2].masked_fill(none, 0.0), want[2].masked_fill(none, 0.0)
        _assert_close(got, want, ("out", "p", "lse", "dq", "dk", "dv"), 3, tol)


@pytest.mark.parametrize("H, J", [(8, 2), (4, 4), (3, 1), (40, 2)])  # GQA; MHA; MQA with 3 heads; a group > 16
def test_sparse_gqa_kernel_matches_twin_small(H, J):
    _check_sparse_gqa(B=2, L=40, H=H, J=J, D=16, K=24, dtype=torch.float32, tol=TOL)


@GPU
@pytest.mark.parametrize("H, J", [(64, 8), (32, 8)])  # Qwen3-32B's attention; Llama-3-8B's
def test_sparse_gqa_kernel_matches_twin_qwen3_shape(H, J):
    _check_sparse_gqa(B=1, L=4096, H=H, J=J, D=128, K=2048, dtype=torch.bfloat16, tol=TOL_SUMMED)


@GPU
def test_topk_kernel_at_128k_columns():
    L, G, D, K = 131072, 64, 128, 2048
    q, k, w = (torch.randn(1, L, G, D, device=DEVICE, dtype=torch.bfloat16), torch.randn(1, L, D, device=DEVICE,
               dtype=torch.bfloat16), torch.randn(1, L, G, device=DEVICE) * (G * D) ** -0.5)
    got = triton_topk.indexer_topk(q, k, w, K)
    rows = torch.tensor([0, 5000, 70000, L - 1], device=DEVICE)  # check a few rows against the twin's logits
    for t in rows.tolist():
        logits = reference.indexer_logits(q[:, t : t + 1], k[:, : t + 1], w[:, t : t + 1], t)[0, 0]
        sel = got[0, t][got[0, t] >= 0]
        assert sel.numel() == min(K, t + 1) and sel.unique().numel() == sel.numel()
        kth = logits.topk(sel.numel()).values[-1]
        assert logits[sel].min() >= kth - 1e-3 * logits.abs().max()


def _check_sparse_indexer_kl(B, L, G, D, K, dtype, tol):
    from train.ops import triton_sparse_indexer_kl

    g = torch.Generator().manual_seed(3)
    qi = torch.randn(B, L, G, D, generator=g).to(DEVICE, dtype).requires_grad_()
    ki = torch.randn(B, L, D, generator=g).to(DEVICE, dtype).requires_grad_()
    wi = (torch.randn(B, L, G, generator=g) * (G * D) ** -0.5).to(DEVICE).requires_grad_()
    _, _, idx = _sparse_inputs(B, L, 1, 16, 16, K, torch.float32)
    p = torch.rand(B, L, idx.shape[-1], generator=g).to(DEVICE).masked_fill(idx < 0, 0)
    p = p / p.sum(-1, keepdim=True)
    up = torch.rand(B, L, generator=g).to(DEVICE)
    res = {}
    for name, fn in (("twin", reference.sparse_indexer_kl), ("kernel", triton_sparse_indexer_kl.sparse_indexer_kl)):
        kl = fn(qi, ki, wi, idx, p)
        res[name] = (kl, *torch.autograd.grad(kl, (qi, ki, wi), up))
    _assert_close(res["kernel"], res["twin"], ("kl", "dqi", "dki", "dwi"), 1, tol)


@pytest.mark.parametrize("G", [16, 8, 3])  # fewer heads than a tile: the padding heads must stay out
def test_sparse_indexer_kl_kernel_matches_twin_small(G):
    _check_sparse_indexer_kl(B=2, L=50, G=G, D=16, K=24, dtype=torch.float32, tol=TOL)


@GPU
@pytest.mark.parametrize("G", [64, 8])  # DeepSeek-V3's indexer, and one scaled to a 16-head model
def test_sparse_indexer_kl_kernel_matches_twin_deepseek_shape(G):
    _check_sparse_indexer_kl(B=1, L=4096, G=G, D=128, K=2048, dtype=torch.bfloat16, tol=TOL)


def _check_dense_indexer_kl(B, L, H, DA, G, D, topk, rows, dtype, tol, q0=0, n=None, J=None, fp8=False):
    """Queries q0..q0+n-1 (default: all) over every key, as a context-parallel piece: kernel against twin.
    J: key heads of the attention target (default H; fewer: GQA). fp8: the recall's top-k is the FP8 indexer's."""
    from train.ops import triton_dense_indexer_kl

    n = n or L - q0
    g = torch.Generator().manual_seed(5)
    qi = torch.randn(B, L, G, D, generator=g)[:, q0 : q0 + n].to(DEVICE, dtype).requires_grad_()
    ki = torch.randn(B, L, D, generator=g).to(DEVICE, dtype).requires_grad_()
    wi = (torch.randn(B, L, G, generator=g) * (G * D) ** -0.5)[:, q0 : q0 + n].to(DEVICE).requires_grad_()
    qa = torch.randn(B, L, H, DA, generator=g)[:, q0 : q0 + n].to(DEVICE, dtype)
    ka = torch.randn(B, L, J or H, DA, generator=g).to(DEVICE, dtype)
    up = torch.rand(B, n, generator=g).to(DEVICE)
    res = {}
    for name, fn in (("twin", lambda *a: reference.dense_indexer_kl(*a, q_offset=q0, fp8=fp8)),
                     ("kernel", lambda *a: triton_dense_indexer_kl.dense_indexer_kl(*a, rows=rows, q_offset=q0,
                                                                                    fp8=fp8))):
        kl, recall = fn(qi, ki, wi, qa, ka, DA ** -0.5, topk)
        res[name] = (kl, recall, *torch.autograd.grad(kl, (qi, ki, wi), up))
    _assert_close(res["kernel"], res["twin"], ("kl", "recall", "dqi", "dki", "dwi"), 2, tol)


@pytest.mark.parametrize("rows", [None, 32])  # one row block, and several
@pytest.mark.parametrize("tiles", [None, dict(BT=16, BS=16, NS=2)])  # one key chunk; several, some skipped
def test_warmup_kl_kernel_matches_twin_small(rows, tiles, monkeypatch):
    from train.ops import triton_dense_indexer_kl

    if tiles:
        monkeypatch.setitem(triton_dense_indexer_kl.CONFIGS, "kl", dict(triton_dense_indexer_kl.CONFIGS["kl"], **tiles))
    da = 24 if DEVICE == "cpu" else 48  # compiled tl.dot needs dims >= 16: d_qk = 32 + 16 on a GPU
    _check_dense_indexer_kl(B=2, L=70, H=2, DA=da, G=16, D=16, topk=8, rows=rows, dtype=torch.float32,
                            tol=TOL)


@pytest.mark.parametrize("rows", [None, 32])
def test_warmup_kl_kernel_with_the_fp8_selection_matches_twin(rows):
    """The recall of the FP8 indexer's top-k (the selection the sparse stage makes); the KL stays the weights'."""
    _check_dense_indexer_kl(B=2, L=70, H=2, DA=32, G=16, D=32, topk=8, rows=rows, dtype=torch.float32, tol=TOL,
                            fp8=True)


@GPU
def test_warmup_kl_kernel_with_the_fp8_selection_matches_twin_deepseek_shape():
    _check_dense_indexer_kl(B=1, L=4096, H=128, DA=192, G=64, D=128, topk=2048, rows=None, dtype=torch.bfloat16,
                            tol=TOL, fp8=True)


def test_warmup_kl_kernel_over_grouped_keys_matches_twin():
    _check_dense_indexer_kl(B=2, L=70, H=4, J=2, DA=16, G=16, D=16, topk=8, rows=32, dtype=torch.float32, tol=TOL)


@GPU
def test_warmup_kl_kernel_matches_twin_qwen3_shape():
    _check_dense_indexer_kl(B=1, L=4096, H=64, J=8, DA=128, G=32, D=128, topk=2048, rows=None,
                            dtype=torch.bfloat16, tol=TOL)


@pytest.mark.parametrize("q0, n", [(35, 35), (10, 20)])  # the zig-zag's second piece; one inside the sequence
def test_warmup_kl_kernel_at_a_query_offset_matches_twin(q0, n, monkeypatch):
    from train.ops import triton_dense_indexer_kl

    tiles = dict(triton_dense_indexer_kl.CONFIGS["kl"], BT=16, BS=16, NS=2)
    monkeypatch.setitem(triton_dense_indexer_kl.CONFIGS, "kl", tiles)
    da = 24 if DEVICE == "cpu" else 48
    _check_dense_indexer_kl(B=2, L=70, H=2, DA=da, G=16, D=16, topk=8, rows=16, dtype=torch.float32, tol=TOL,
                            q0=q0, n=n)


def test_warmup_kl_twin_of_query_pieces_equals_the_whole_sequence():
    q, k, w = _exact_indexer_inputs(1, 64, 2, 16, seed=6)
    g = torch.Generator().manual_seed(7)
    qa, ka = torch.randn(1, 64, 2, 16, generator=g).to(DEVICE), torch.randn(1, 64, 2, 16, generator=g).to(DEVICE)
    whole = reference.dense_indexer_kl(q, k, w, qa, ka, 0.25, 8)
    for q0, n in ((0, 16), (16, 16), (32, 32)):
        piece = reference.dense_indexer_kl(q[:, q0 : q0 + n], k, w[:, q0 : q0 + n], qa[:, q0 : q0 + n], ka, 0.25, 8,
                                           q_offset=q0)
        for got, want in zip(piece, whole):
            torch.testing.assert_close(got, want[:, q0 : q0 + n], rtol=1e-6, atol=1e-7)


@GPU
def test_warmup_kl_kernel_matches_twin_deepseek_shape():
    _check_dense_indexer_kl(B=1, L=4096, H=128, DA=192, G=64, D=128, topk=2048, rows=None, dtype=torch.bfloat16,
                            tol=TOL)


# A tiny model whose every head dim the kernels take: d_qk 16 + 16, latent 32 + rope 16, indexer 16 x 16.
KERNEL_ARCH = tiny("deepseek_v3", num_hidden_layers=2, qk_rope_head_dim=16)


# The same with head dims TileLang's tiles take (latent 64, rope 32).
TILELANG_ARCH = dict(KERNEL_ARCH, kv_lora_rank=64, qk_rope_head_dim=32)


def _stage_run(stage_name, arch=KERNEL_ARCH, index_head_dim=16):
    """A tiny model and one batch: run() -> (metrics, gradients) of the stage loss under the current settings."""
    from tests.conftest import perturb_
    from train.model import ModelConfig, build_model
    from train.stages import STAGES, StageConfig, compute_loss, param_groups, settle_metrics

    # the selection in the weights' dtype (on a Hopper GPU `auto` would take it in FP8: tested op by op above)
    model = build_model(ModelConfig(arch=arch, index_n_heads=16, index_head_dim=index_head_dim, index_topk=8,
                                    index_dtype="bf16"))
    perturb_(model, seed=2)
    model.to(DEVICE)
    stage = STAGES[stage_name]
    params = [p for g in param_groups(model, stage, StageConfig(name=stage_name)) for p in g["params"]]
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def run():
        loss, metrics = compute_loss(model, stage, StageConfig(name=stage_name), ids, torch.roll(ids, -1, 1))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        metrics = settle_metrics(model, stage, StageConfig(name=stage_name), metrics)
        return metrics, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return model, run


# On a GPU, Triton's dots take fp32 operands in TF32 (10-bit mantissa), where the twins' torch matmuls stay fp32: an
# indexer weight whose gradient is small (the KL near its minimum) can then differ by 8% of its own largest entry,
# yet by 3e-4 of the model's largest gradient entry (reproduced on CPU: test_tf32_dots_explain_the_gpu_gradient_gap).
# A gradient is therefore judged against its own largest entry or, if larger, this share of the model's.
GRAD_FLOOR = 0.02 if DEVICE == "cuda" else 0.0


def _gradient_errors(g_got, g_want, floor=GRAD_FLOOR):
    """Each gradient's largest error over max(its own largest entry, floor x the model's largest entry)."""
    model_max = max(b.abs().max().item() for b in g_want)
    return [(a - b).abs().max().item() / max(b.abs().max().item(), floor * model_max, 1e-12)
            for a, b in zip(g_got, g_want)]


def _assert_same_run(got, want):
    (m_want, g_want), (m_got, g_got) = want, got
    for key in m_want:
        assert abs(m_want[key].item() - m_got[key].item()) <= TOL_FWD * max(1.0, abs(m_want[key].item())), key
    errs = _gradient_errors(g_got, g_want)
    worst = max(errs)  # fp32 summation order, carried through two layers; TF32 on a GPU
    assert worst <= max(TOL, 1e-4), ("worst gradient", errs.index(worst), worst)


# A tiny Qwen3-layout GQA model (q/k norms, 4 query heads over 2 key heads of 16) whose dims the kernels take.
GQA_ARCH = tiny("qwen3", num_hidden_layers=2)


@pytest.mark.parametrize("arch", ["mla", "gqa"])
@pytest.mark.parametrize("stage_name", ["warmup", "sparse"])
def test_model_stage_losses_and_grads_equal_with_kernels(stage_name, arch, monkeypatch):
    """Through the dispatch point: a whole stage loss (all four ops) and its gradients, kernels vs twins."""
    _, run = _stage_run(stage_name, KERNEL_ARCH if arch == "mla" else GQA_ARCH)
    res = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("DSA_KERNELS", backend)
        res[backend] = run()
    _assert_same_run(res["triton"], res["reference"])


@pytest.fixture
def tf32_dots(monkeypatch):
    """The interpreter's dots take fp32 operands as a GPU's tensor cores do under Triton: as TF32, each operand's low
    13 mantissa bits dropped (truncation; rounding to nearest instead gives errors 2-5x smaller than the GPU's)."""
    from triton.runtime import interpreter

    real = interpreter.InterpreterBuilder.create_dot

    def tf32_dot(self, a, b, d, *args):
        if a.data.dtype == np.float32:
            a, b = (interpreter.TensorHandle((t.data.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32),
                                             t.dtype.scalar) for t in (a, b))
        return real(self, a, b, d, *args)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", tf32_dot)


@pytest.mark.skipif(DEVICE != "cpu", reason="emulates on CPU what a GPU's TF32 dots do")
def test_tf32_dots_explain_the_gpu_gradient_gap(tf32_dots, monkeypatch):
    """With the GPU's TF32 dots (`tf32_dots`): the GQA sparse stage's losses still match the twin's, its worst
    gradient is an indexer weight's, off by more than 5e-2 of its own largest entry (what the GPU showed: 0.08)
    though that entry is under 2% of the model's largest, and the GPU's rule (GRAD_FLOOR) passes it."""
    from train.stages import STAGES, StageConfig, param_groups

    model, run = _stage_run("sparse", GQA_ARCH)
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in param_groups(model, STAGES["sparse"], StageConfig(name="sparse"))
             for p in g["params"]]  # _stage_run's order
    res = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("DSA_KERNELS", backend)
        res[backend] = run()
    (m_want, g_want), (m_got, g_got) = res["reference"], res["triton"]
    for key in m_want:
        assert abs(m_want[key].item() - m_got[key].item()) <= 1e-2 * max(1.0, abs(m_want[key].item())), key
    own = _gradient_errors(g_got, g_want, floor=0.0)
    worst = own.index(max(own))
    model_max = max(b.abs().max().item() for b in g_want)
    assert own[worst] > 5e-2 and ".indexer." in names[worst], (names[worst], own[worst])
    assert g_want[worst].abs().max().item() < 0.02 * model_max
    assert max(_gradient_errors(g_got, g_want, floor=0.02)) <= 5e-2


@pytest.mark.skipif(DEVICE != "cpu", reason="emulates on CPU what a GPU's TF32 dots do")
def test_tf32_dots_explain_the_gpu_absorbed_output_gap(tf32_dots):
    """With the GPU's TF32 dots, the chunked absorbed path in fp32 gives the GPU's figures (H100, 2026-12-07: the
    one-pass recomputation's output 1.258e-2 of its largest entry, p 4.28e-3, dq_nope 6.27e-3): past TOL_FWD, within
    the GPU's TOL_FWD_TF32."""
    plain, given_lse = _check_absorbed(triton_sparse_mla, torch.float32, 5e-2, tol_fwd=2e-2)
    assert 1e-2 < given_lse["out"] < 1.3e-2 and 4e-3 < given_lse["p"] < 4.5e-3 and plain["out"] < 2e-3


@pytest.mark.parametrize("arch", ["mla", "gqa"])
def test_checkpoint_recomputation_reuses_the_attention_lse(arch, monkeypatch):
    """Under activation checkpointing each layer's recomputation gets the sparse attention's output and
    probabilities in one pass from the forward's log-sum-exp, and the forward runs no probabilities pass (the
    indexer KL is computed in backward from the recomputation's): the plain run's metrics and gradients."""
    monkeypatch.setenv("DSA_KERNELS", "triton")
    module, name = (triton_sparse_mla, "sparse_mla") if arch == "mla" else (triton_sparse_gqa, "sparse_gqa")
    calls = []
    for kernel in ("probs", "forward_given_lse"):
        real = getattr(module, f"{name}_{kernel}")
        monkeypatch.setattr(module, f"{name}_{kernel}", lambda *a, _k=kernel, _f=real: calls.append(_k) or _f(*a))
    model, run = _stage_run("sparse", KERNEL_ARCH if arch == "mla" else GQA_ARCH)
    plain = run()
    layers = len(model.layers)
    assert calls == ["probs"] * layers
    calls.clear()
    model.activation_checkpointing = True
    _assert_same_run(run(), plain)
    assert calls == ["forward_given_lse"] * layers


@TILELANG
@pytest.mark.parametrize("H", [128, 16, 40])  # DeepSeek-V3; the 1B model; a head count not a multiple of 64
def test_tilelang_sparse_mla_matches_twin_deepseek_shape(H):
    _check_sparse_mla(B=1, L=4096, H=H, DV=512, DR=64, K=2048, dtype=torch.bfloat16, tol=TOL_SUMMED,
                      kernel=tilelang_sparse_mla.sparse_mla)


@TILELANG
def test_tilelang_sparse_mla_matches_twin_small():
    # K not a multiple of the key block, two batches, early rows with fewer than K keys, a row with none
    _check_sparse_mla(B=2, L=200, H=20, DV=64, DR=32, K=40, dtype=torch.bfloat16, tol=TOL,
                      kernel=tilelang_sparse_mla.sparse_mla)


@TILELANG
def test_tilelang_warp_specialised_sparse_mla_matches_twin_small():
    # the warp-specialised kernels: two head blocks adding into one p, padding heads, K padded to the ring
    assert tilelang_sparse_mla.warp_specialised(72, 128, 64) and not tilelang_sparse_mla.warp_specialised(40, 64, 32)
    _check_sparse_mla(B=2, L=200, H=72, DV=128, DR=64, K=40, dtype=torch.bfloat16, tol=TOL,
                      kernel=tilelang_sparse_mla.sparse_mla)


def _assert_bf16_runs_close(got, want, label):
    """Two bf16 runs of `_stage_run`: metrics within 2e-2, every gradient within 5e-2 of its largest entry."""
    (m_got, g_got), (m_want, g_want) = got, want
    for key in m_want:
        assert abs(m_got[key].float().item() - m_want[key].float().item()) <= 2e-2 * max(
            1.0, abs(m_want[key].float().item())), (label, key)
    errs = [(a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-12)
            for a, b in zip(g_got, g_want)]
    assert max(errs) <= 5e-2, (label, "worst gradient", errs.index(max(errs)), max(errs))


@TILELANG
def test_model_sparse_stage_with_tilelang_equals_triton(monkeypatch):
    """Through the dispatch point, in bf16: the sparse stage's loss and gradients with TileLang's sparse MLA
    against the Triton kernels, under activation checkpointing too (the one-pass recomputation)."""
    model, run = _stage_run("sparse", TILELANG_ARCH, index_head_dim=32)
    model.to(torch.bfloat16)
    res = {}
    for backend in ("triton", "tilelang"):
        monkeypatch.setenv("DSA_KERNELS", backend)
        res[backend] = run()
        model.activation_checkpointing = True
        res[backend + " checkpointed"] = run()
        model.activation_checkpointing = False
    for name in ("tilelang", "tilelang checkpointed", "triton checkpointed"):
        _assert_bf16_runs_close(res[name], res["triton"], name)


@TILELANG
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_checkpointed_tilelang_gradients_differ_only_where_the_gradient_is_near_zero(monkeypatch, seed):
    """DeepSeek's latent rows (512 + 64) at 64 heads, bf16: the sparse stage under activation checkpointing against
    the plain step, with TileLang's kernels. The losses agree; every parameter's gradient is within 1e-2 of the
    model's largest gradient entry; a parameter whose gradient differs by more than 5e-2 of its own largest entry
    has a gradient near zero (below 1e-2 of the model's), where the fp32 atomics' order and two probability kernels
    weigh on a tiny sum (the 0.24 once seen; `python -m bench.checkpoint_gap` lists every parameter)."""
    from bench.checkpoint_gap import gaps
    from train import metrics

    monkeypatch.setenv("DSA_KERNELS", "tilelang")
    m_plain, m_ckpt, rows = gaps("tilelang", seed)
    for key in (metrics.LM_LOSS, metrics.INDEXER_KL):
        assert m_ckpt[key] == pytest.approx(m_plain[key], rel=1e-3, abs=1e-6), key
    for rel, rel_all, _, own, name in rows:
        assert rel_all <= 1e-2, (name, rel_all)
        assert rel <= 5e-2 or own <= 1e-2, (name, rel, own)


def test_backend_choice(monkeypatch):
    from train import ops

    monkeypatch.delenv("DSA_KERNELS", raising=False)
    assert ops.backend() == "auto"
    monkeypatch.setenv("DSA_KERNELS", "fast")
    with pytest.raises(ValueError, match="DSA_KERNELS='fast'; allowed: auto, reference, triton, tilelang, cudnn"):
        ops.backend()


def _check_absorbed(kernels, dtype, tol, B=2, L=40, H=4, N=16, R=16, A=32, V=16, K=24, chunk=16, tol_fwd=TOL_FWD):
    """ops.absorbed_sparse_mla in query chunks (the kernels' path) against the plain composition on the twin:
    outputs, probabilities, log-sum-exp, and the gradients of the query parts, the latent rows and both weights;
    also given the log-sum-exp (the checkpoint recomputation)."""
    from train import ops
    from train.ops.autograd import AbsorbedSparseMLA

    g = torch.Generator().manual_seed(4)
    leaves = [torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_() for shape in (
        (B, L, H, N), (B, L, H, R), (B, L, A + R), (H, N, A), (H, V, A))]
    _, _, idx = _sparse_inputs(B, L, 1, 16, 16, K, torch.float32)
    up = torch.randn(B, L, H, V, generator=g).to(DEVICE, dtype)
    q_nope, q_rope, kv, w_uk, w_uv = leaves

    def run(fn, lse=None):
        out, p, lse_out = fn(q_nope, q_rope, kv, idx, w_uk, w_uv, 0.2, lse)
        return (out, p, lse_out.masked_fill(torch.isinf(lse_out), 0), *torch.autograd.grad(out, leaves, up))

    def twin(*args):
        q = ops.absorbed_query(args[0], args[1], args[4])
        out, p, lse = reference.sparse_mla(q, args[2], args[3], args[6], A, args[7])
        return torch.einsum("blha,hva->blhv", out, args[5]), p, lse

    def chunked(*args):
        return AbsorbedSparseMLA.apply(kernels, *args, chunk, True)
    want = run(twin)
    names = ("out", "p", "lse", "dq_nope", "dq_rope", "dkv", "dw_uk", "dw_uv")
    return [_assert_close(run(chunked), want, names, 3, tol, tol_fwd),
            _assert_close(run(chunked, want[2]), want, names, 3, tol, tol_fwd)]


# fp32 on a GPU: Triton's dots hand fp32 operands to the tensor cores as TF32, dropping each one's low 13 mantissa
# bits (truncation); the one-pass recomputation's output, which sums such products through P·V, lands at 1.26e-2
# of its largest entry there, as `test_tf32_dots_explain_the_gpu_absorbed_output_gap` reproduces on CPU.
TOL_FWD_TF32 = 2e-2 if DEVICE == "cuda" else TOL_FWD


def test_absorbed_sparse_mla_in_query_chunks_matches_twin():
    _check_absorbed(triton_sparse_mla, torch.float32, TOL, tol_fwd=TOL_FWD_TF32)


@TILELANG
def test_absorbed_sparse_mla_tilelang_matches_twin():
    _check_absorbed(tilelang_sparse_mla, torch.bfloat16, TOL, L=300, H=20, N=32, R=32, A=64, V=32, K=100, chunk=128)


# cuDNN's sparse MLA backward: its adapter (batches as one flat sequence, selections shifted and padded, chunks
# summed) on CPU, against a stand-in for cuDNN's flat kernel built from the twin; the kernel itself on a GPU.

def _flat_twin_backward(q, kv, out, dout, lse, sink, idx, softmax_scale):
    """cuDNN's flat contract, computed by the twin: one sequence, selections of whole key blocks indexing it."""
    N, H, _ = q.shape
    assert idx.dtype == torch.int32 and idx.shape[-1] % cudnn_sparse_mla.KEY_BLOCK == 0
    assert lse.shape == (N, H) and torch.isneginf(sink).all() and sink.shape == (H,)
    q1, kv1 = q[None].detach().requires_grad_(), kv[None].detach().requires_grad_()
    with torch.enable_grad():  # called from inside a backward
        o, _, _ = reference.sparse_mla(q1, kv1, idx[None].long(), softmax_scale, dout.shape[-1])
        dq, dkv = torch.autograd.grad(o, (q1, kv1), dout[None])
    return {"dq": dq[0], "dkv": dkv[0]}


@pytest.mark.skipif(DEVICE != "cpu", reason="exact in the interpreter (fp32); on a GPU the kernel's own tests cover it")
def test_cudnn_backward_adapter_matches_twin(monkeypatch):
    monkeypatch.setattr(cudnn_sparse_mla, "_flat_backward", lambda: _flat_twin_backward)
    kernels = ComposedSparseMLA(triton_sparse_mla, backward=cudnn_sparse_mla)
    _check_sparse_mla(B=2, L=40, H=16, DV=32, DR=16, K=24, dtype=torch.float32, tol=TOL, kernel=kernels.sparse_mla)
    _check_absorbed(kernels, torch.float32, TOL)


def test_cudnn_flat_selection():
    idx = torch.tensor([[[0, 2, -1]], [[1, -1, 0]]])
    flat = common.flat_selection(idx, 5, cudnn_sparse_mla.KEY_BLOCK)
    assert flat.dtype == torch.int32 and flat.shape == (2, 64)
    assert flat[:, :3].tolist() == [[0, 2, -1], [6, -1, 5]] and (flat[:, 3:] == -1).all()
    one = torch.randint(-1, 5, (1, 3, 64), dtype=torch.int32)  # one sequence of whole key blocks: as it is
    assert torch.equal(common.flat_selection(one, 5, cudnn_sparse_mla.KEY_BLOCK), one[0])


def test_cudnn_backend_choice(monkeypatch):
    from train import ops

    monkeypatch.setenv("DSA_KERNELS", "cudnn")
    monkeypatch.setattr(ops, "_cudnn_importable", lambda: False)
    with pytest.raises(ValueError, match="DSA_KERNELS=cudnn, but NVIDIA's cuDNN frontend does not import here"):
        ops.backend()
    monkeypatch.setattr(ops, "_cudnn_importable", lambda: True)
    q, kv, idx = _sparse_inputs(1, 8, 4, 32, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="DSA_KERNELS=cudnn with torch.float32 tensors, latent rows of 48, d_v 32 on "):
        ops.sparse_mla(q, kv, idx, 0.1, 32)
    monkeypatch.setenv("DSA_KERNELS", "auto")  # auto never asks for it where it cannot run
    assert ops._sparse_mla_kernels(q, kv, 32) in (None, triton_sparse_mla)
    # the plan's log line names what runs
    assert ops.sparse_mla_kernels_name(q, kv, 32) == ("triton" if DEVICE == "cuda" else "reference")
    monkeypatch.setenv("DSA_KERNELS", "triton")
    assert ops.sparse_mla_kernels_name(q, kv, 32) == "triton"
    monkeypatch.setattr(ops, "_use_cudnn", lambda *args: True)
    assert ops.sparse_mla_kernels_name(q, kv, 32) == "triton, cudnn backward"


@CUDNN
@pytest.mark.parametrize("H", [128, 16, 80])  # DeepSeek-V3; the 1B model; a head count not a multiple of 64
def test_cudnn_backward_matches_twin_deepseek_shape(H):
    _check_sparse_mla(B=1, L=4096, H=H, DV=512, DR=64, K=2048, dtype=torch.bfloat16, tol=TOL_SUMMED,
                      kernel=ComposedSparseMLA(tilelang_sparse_mla, backward=cudnn_sparse_mla).sparse_mla)


@CUDNN
@pytest.mark.parametrize("forward", ["tilelang", "triton"])
def test_cudnn_backward_matches_twin_small(forward):
    # two batches, K not a multiple of the key block, early rows with fewer than K keys, a row with none
    kernels = ComposedSparseMLA(tilelang_sparse_mla if forward == "tilelang" else triton_sparse_mla,
                                backward=cudnn_sparse_mla)
    _check_sparse_mla(B=2, L=200, H=20, DV=512, DR=64, K=40, dtype=torch.bfloat16, tol=TOL, kernel=kernels.sparse_mla)
    _check_absorbed(kernels, torch.bfloat16, TOL, L=300, H=20, N=32, R=64, A=512, V=32, K=100, chunk=128)


@CUDNN
def test_model_sparse_stage_with_cudnn_backward_equals_tilelang(monkeypatch):
    """A model with DeepSeek's latent rows (512 + 64) and 64 heads, through the dispatch point, in bf16: TileLang's
    forward with cuDNN's backward against TileLang's own backward, each run plain and under activation
    checkpointing (compared with the same mode: only the backward differs)."""
    from train import ops

    arch = dict(KERNEL_ARCH, num_attention_heads=64, num_key_value_heads=64, kv_lora_rank=512, qk_rope_head_dim=64)
    model, run = _stage_run("sparse", arch, index_head_dim=64)
    model.to(torch.bfloat16)
    res = {}
    for checkpointed in (False, True):
        model.activation_checkpointing = checkpointed
        for backend in ("tilelang", "cudnn"):
            monkeypatch.setenv("DSA_KERNELS", backend)
            res[backend, checkpointed] = run()
    for checkpointed in (False, True):
        _assert_bf16_runs_close(res["cudnn", checkpointed], res["tilelang", checkpointed], checkpointed)
    monkeypatch.setenv("DSA_KERNELS", "auto")
    q = torch.zeros(1, 8, 64, 128, device=DEVICE, dtype=torch.bfloat16)  # the absorbed path's query part
    kv = torch.zeros(1, 8, 576, device=DEVICE, dtype=torch.bfloat16)
    assert ops._sparse_mla_kernels(q, kv, 512).backward_from is cudnn_sparse_mla


# FlashMLA's sparse forward: its adapter (one flat sequence, selections of whole key blocks, +inf log-sum-exp for
# a query with no selection) on CPU against a stand-in built from the twin; the kernel itself on a GPU.

def _flat_twin_forward(q, kv, indices, sm_scale, d_v=512, use_legacy=False):
    """FlashMLA's flat contract computed by the twin: (out [N, H, d_v], max logits, lse [N, H]: -inf where a query
    has no selection)."""
    assert use_legacy and kv.shape[1] == 1 and indices.shape[1] == 1 and indices.dtype == torch.int32
    assert indices.shape[-1] % flashmla_sparse_mla.KEY_BLOCK == 0
    out, _, lse = reference.sparse_mla(q[None], kv[:, 0][None], indices[:, 0][None].long(), sm_scale, d_v)
    return out[0], None, lse[0].masked_fill(torch.isinf(lse[0]), float("-inf"))


@pytest.mark.skipif(DEVICE != "cpu", reason="exact in the interpreter (fp32); on a GPU the kernel's own tests cover it")
def test_flashmla_forward_adapter_matches_twin(monkeypatch):
    monkeypatch.setattr(flashmla_sparse_mla, "_sparse_fwd", lambda: _flat_twin_forward)
    kernels = ComposedSparseMLA(triton_sparse_mla, forward=flashmla_sparse_mla)
    _check_sparse_mla(B=2, L=40, H=16, DV=32, DR=16, K=24, dtype=torch.float32, tol=TOL, kernel=kernels.sparse_mla)
    _check_absorbed(kernels, torch.float32, TOL)
    q, kv, idx = _sparse_inputs(2, 40, 16, 32, 16, 24, torch.float32)
    _, lse = kernels.sparse_mla_forward(q.detach(), kv.detach(), idx, 0.2, 32)
    assert torch.isposinf(lse[:, 20]).all() and torch.isfinite(lse[:, :20]).all()  # the row with no selection


def test_flashmla_dispatch(monkeypatch):
    """FlashMLA's forward goes under the other kernels (probabilities, recomputation) and cuDNN's backward; the plan's
    line names it."""
    from train import ops

    q, kv, idx = _sparse_inputs(1, 8, 4, 32, 16, 4, torch.float32)
    monkeypatch.setattr(ops, "_use_flashmla", lambda *args: True)
    monkeypatch.setattr(ops, "_use_cudnn", lambda *args: True)
    monkeypatch.setenv("DSA_KERNELS", "triton")  # a forward kernel where the test runs (the interpreter on CPU)
    assert ops.sparse_mla_kernels_name(q, kv, 32) == "triton, flashmla forward, cudnn backward"
    kernels = ops._sparse_mla_kernels(q, kv, 32)
    assert (kernels.base, kernels.forward_from, kernels.backward_from) == (triton_sparse_mla, flashmla_sparse_mla,
                                                                           cudnn_sparse_mla)
    assert kernels.sparse_mla_probs is triton_sparse_mla.sparse_mla_probs
    assert not flashmla_sparse_mla.fits(q, kv, 32)  # fp32, latent rows of 48: not FlashMLA's


@FLASHMLA
@pytest.mark.parametrize("H", [128, 64])
def test_flashmla_forward_matches_twin_deepseek_shape(H):
    _check_sparse_mla(B=1, L=4096, H=H, DV=512, DR=64, K=2048, dtype=torch.bfloat16, tol=TOL_SUMMED,
                      kernel=ComposedSparseMLA(tilelang_sparse_mla, forward=flashmla_sparse_mla).sparse_mla)


@FLASHMLA
def test_flashmla_forward_matches_twin_small():
    # two batches, K not a multiple of the key block, early rows with fewer than K keys, a row with none
    kernels = ComposedSparseMLA(tilelang_sparse_mla, forward=flashmla_sparse_mla)
    _check_sparse_mla(B=2, L=200, H=64, DV=512, DR=64, K=40, dtype=torch.bfloat16, tol=TOL, kernel=kernels.sparse_mla)
    _check_absorbed(kernels, torch.bfloat16, TOL, L=300, H=64, N=32, R=64, A=512, V=32, K=100, chunk=128)
