"""Each DSA kernel at DeepSeek-V3's attention shape (batch 1, bf16), next to its PyTorch twin and SDPA.

  sparse_mla fwd / probs / bwd   the fast kernels (FLOPs: `sparse_mla_flops`, backward 2.5x), the one-pass
                                 forward + probabilities of the checkpoint recomputation, and the forward on
                                 window selections (neighbours share their rows: the cost of the gathers)
  sparse_mla twin fwd+bwd        the chunked PyTorch reference (lengths <= --twin-max)
  sdpa fwd / fwd+bwd             torch SDPA, causal, MLA's dense shape (d_qk 192, d_v 128)
  warmup_kl fwd+bwd              the warm-up loss (KL to the head-averaged attention of 128 heads of d_qk 192,
                                 recall, the indexer's gradient), and its twin (lengths <= 8K)
  indexer_topk                   indexer logits + top-k, the chunked twin, and plain PyTorch (all-head einsum
                                 + topk; it runs out of memory past 16K)
  sparse_gqa fwd / bwd           sparse GQA at Qwen3-32B's attention shape (64 query heads over 8 key heads of
                                 128, top-2048), beside SDPA's dense causal GQA (FlashAttention) at that shape;
                                 TF/s over the FLOPs each really does (sparse: valid selections only)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import DI, DR, DV, TOPK, G, H, causal_selection, guarded, sparse_mla_flops, window_selection
from train.ops import common, reference


def sparse_mla_inputs(L: int, heads: int = H, selection=causal_selection):
    q = torch.randn(1, L, heads, DV + DR, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, L, DV + DR, device="cuda", dtype=torch.bfloat16)
    idx = selection(L, TOPK, "cuda")
    return q, kv, idx, int((idx >= 0).sum())  # selected: valid (query, key) pairs


def sparse_mla_backends() -> dict:
    """The sparse MLA kernel modules this machine runs: Triton's, and TileLang's on a Hopper GPU."""
    from train.ops import triton_sparse_mla

    backends = {"triton": triton_sparse_mla}
    try:
        from train.ops import tilelang_sparse_mla
    except ImportError:
        return backends
    if common.is_hopper(torch.device("cuda")):
        backends["tilelang"] = tilelang_sparse_mla
    return backends


def bench_sparse_mla(L: int, iters: int, twin_max: int, heads: int = H, public: str | None = None,
                     backends=("triton", "tilelang"), cudnn: bool = False) -> list[dict]:
    """`public`: the directory of the public TileLang kernels to time beside ours (`bench/public.py`);
    `backends`: the kernels timed, of those the machine runs; `cudnn`: time cuDNN's backward beside TileLang's
    (`bench/cudnn.py`)."""
    q, kv, idx, selected = sparse_mla_inputs(L, heads)
    window = window_selection(L, TOPK, "cuda")
    fwd_flops = sparse_mla_flops(heads, selected)
    scale = (128 + 64) ** -0.5
    rows = []
    for name, k in sparse_mla_backends().items():
        if name not in backends:
            continue
        if public and name == "tilelang":
            from bench.public import bench_public

            rows += bench_public(public, k, q, kv, idx, scale, iters)
        if cudnn and name == "tilelang":
            from bench.cudnn import bench_cudnn

            rows += bench_cudnn(k, q, kv, idx, scale, iters)
        out, lse = k.sparse_mla_forward(q, kv, idx, scale, DV)
        g = torch.randn_like(out)
        rows += [
            guarded(f"sparse_mla {name} fwd", lambda: k.sparse_mla_forward(q, kv, idx, scale, DV), iters, fwd_flops),
            guarded(f"sparse_mla {name} probs", lambda: k.sparse_mla_probs(q, kv, idx, lse, scale, DV), iters,
                    2 * heads * selected * (DV + DR)),
            guarded(f"sparse_mla {name} bwd", lambda: k.sparse_mla_backward(q, kv, idx, out, lse, g, scale, DV),
                    iters, 2.5 * fwd_flops),
            guarded(f"sparse_mla {name} fwd+probs given lse",
                    lambda: k.sparse_mla_forward_given_lse(q, kv, idx, lse, scale, DV), iters, fwd_flops),
            # the same work on selections that neighbouring queries share (all but one row): what the forward
            # gains when its gathers hit the cache, i.e. how much of its time the gathers cost
            guarded(f"sparse_mla {name} fwd, window selection",
                    lambda: k.sparse_mla_forward(q, kv, window, scale, DV), iters,
                    sparse_mla_flops(heads, int((window >= 0).sum())))]
    if L <= twin_max:
        qg, kvg = q.clone().requires_grad_(), kv.clone().requires_grad_()
        g = torch.randn(*q.shape[:3], DV, device="cuda", dtype=torch.bfloat16)

        def twin():
            o = reference.sparse_mla(qg, kvg, idx, scale, DV)[0]
            torch.autograd.grad(o, (qg, kvg), g)
        rows.append(guarded("sparse_mla twin fwd+bwd", twin, max(1, iters // 3), 3.5 * fwd_flops))
    if heads != H:
        rows = [{**r, "name": f"{r['name']}, {heads} heads"} for r in rows]
    return rows


def bench_warmup_kl(L: int, iters: int, twin_max: int, config: dict | None = None,
                    label: str = "warmup_kl fwd+bwd") -> list[dict]:
    """The warm-up loss (forward + the indexer's backward); `config`: the KL kernel's launch configuration."""
    dev = "cuda"
    qi = torch.randn(1, L, G, DI, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ki = torch.randn(1, L, DI, device=dev, dtype=torch.bfloat16, requires_grad=True)
    wi = (torch.randn(1, L, G, device=dev) * (G * DI) ** -0.5).requires_grad_()
    qa = torch.randn(1, L, H, 192, device=dev, dtype=torch.bfloat16)
    ka = torch.randn(1, L, H, 192, device=dev, dtype=torch.bfloat16)
    from train.ops import triton_dense_indexer_kl

    def run(fn, **kw):
        kl, _ = fn(qi, ki, wi, qa, ka, 192 ** -0.5, TOPK, **kw)
        torch.autograd.grad(kl.mean(), (qi, ki, wi))
    rows = [guarded(label, lambda: run(triton_dense_indexer_kl.dense_indexer_kl, config=config), iters)]
    if L <= min(twin_max, 8192):  # the twin loops over 16-row blocks in Python: minutes past 8K
        rows.append(guarded("warmup_kl twin fwd+bwd", lambda: run(reference.dense_indexer_kl), max(1, iters // 3)))
    return rows


def bench_sdpa(L: int, iters: int, heads: int = H, label: str = "") -> list[dict]:
    """SDPA on MLA's dense (non-absorbed) shape: what the dense model runs."""
    dev = "cuda"
    qa = torch.randn(1, heads, L, 192, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ka = torch.randn(1, heads, L, 192, device=dev, dtype=torch.bfloat16, requires_grad=True)
    va = torch.randn(1, heads, L, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    sdpa_flops = 2 * heads * (L * (L + 1) / 2) * (192 + 128)

    def sdpa_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(qa, ka, va, is_causal=True)

    def sdpa_fwd_bwd():
        o = F.scaled_dot_product_attention(qa, ka, va, is_causal=True)
        o.backward(torch.ones_like(o))
    return [guarded(f"sdpa fwd{label}", sdpa_fwd, iters, sdpa_flops),
            guarded(f"sdpa fwd+bwd{label}", sdpa_fwd_bwd, iters, 3.5 * sdpa_flops)]


# Qwen3-32B's attention: 64 query heads over 8 key heads, head dim 128.
GQA_H, GQA_J, GQA_D = 64, 8, 128


def bench_sparse_gqa(L: int, iters: int) -> list[dict]:
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(1, L, GQA_H, GQA_D, device=dev, dtype=dt)
    k = torch.randn(1, L, GQA_J, GQA_D, device=dev, dtype=dt)
    v = torch.randn(1, L, GQA_J, GQA_D, device=dev, dtype=dt)
    rows = _sparse_gqa_rows(q, k, v, causal_selection(L, TOPK, dev), iters)
    qd, kd, vd = (x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    dense_flops = 2 * GQA_H * (L * (L + 1) / 2) * 2 * GQA_D

    def sdpa_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)

    def sdpa_fwd_bwd():
        o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
        o.backward(torch.ones_like(o))
    return rows + [guarded("sparse_gqa sdpa dense fwd", sdpa_fwd, iters, dense_flops),
                   guarded("sparse_gqa sdpa dense fwd+bwd", sdpa_fwd_bwd, iters, 3.5 * dense_flops)]


def _sparse_gqa_rows(q, k, v, idx, iters: int) -> list[dict]:
    """The Triton kernels' rows (their outputs freed on return, before SDPA runs)."""
    from train.ops import triton_sparse_gqa as kernels

    fwd_flops = 2 * GQA_H * int((idx >= 0).sum()) * 2 * GQA_D
    scale = GQA_D**-0.5
    out, lse = kernels.sparse_gqa_forward(q, k, v, idx, scale)
    g = torch.randn_like(out)
    return [guarded("sparse_gqa triton fwd", lambda: kernels.sparse_gqa_forward(q, k, v, idx, scale), iters,
                    fwd_flops),
            guarded("sparse_gqa triton probs", lambda: kernels.sparse_gqa_probs(q, k, v, idx, lse, scale), iters,
                    fwd_flops / 2),
            guarded("sparse_gqa triton bwd", lambda: kernels.sparse_gqa_backward(q, k, v, idx, out, lse, g, scale),
                    iters, 2.5 * fwd_flops)]


def bench_topk(L: int, iters: int, twin_max: int, plain_max: int) -> list[dict]:
    dev = "cuda"
    q = torch.randn(1, L, G, DI, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, L, DI, device=dev, dtype=torch.bfloat16)
    w = torch.randn(1, L, G, device=dev) * (G * DI) ** -0.5
    flops = 2 * G * DI * L * (L + 1) / 2
    from train.ops import triton_topk

    rows = [guarded("indexer_topk triton", lambda: triton_topk.indexer_topk(q, k, w, TOPK), iters, flops)]
    if L <= twin_max:
        rows.append(guarded("indexer_topk twin", lambda: reference.indexer_topk(q, k, w, TOPK), iters, flops))
    if L <= plain_max:
        # The plain version: the reference formula over the whole sequence at once (fp32), then topk.
        rows.append(guarded("indexer_topk plain pytorch fp32", lambda: reference.indexer_logits(q, k, w, 0).topk(
            TOPK, dim=-1).indices, iters, flops))

        def plain_bf16():  # the same in bf16 einsums: half the memory, faster
            scores = torch.einsum("btgd,bsd->btgs", q, k).relu()
            logits = torch.einsum("btgs,btg->bts", scores, w.to(scores.dtype))
            logits = logits.masked_fill(torch.ones(L, L, device=dev, dtype=torch.bool).triu(1), float("-inf"))
            return logits.topk(TOPK, dim=-1).indices
        rows.append(guarded("indexer_topk plain pytorch bf16", plain_bf16, iters, flops))
    return rows
