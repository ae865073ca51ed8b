"""Each DSA kernel at DeepSeek-V3's attention shape (batch 1, bf16), next to its PyTorch twin and SDPA.

  sparse_mla fwd / probs / bwd   the fast kernels (FLOPs: `sparse_mla_flops`, backward 2.5x), the one-pass
                                 forward + probabilities of the checkpoint recomputation, and the forward on
                                 window selections (neighbours share their rows: the cost of the gathers)
  sparse_mla twin fwd+bwd        the chunked PyTorch reference (lengths <= --twin-max)
  sdpa fwd / fwd+bwd             torch SDPA, causal, MLA's dense shape (d_qk 192, d_v 128)
  warmup_kl fwd+bwd              the warm-up loss (KL to the head-averaged attention of 128 heads of d_qk 192,
                                 recall, the indexer's gradient), and its twin (lengths <= 8K)
  indexer_topk                   indexer logits + top-k in bf16 and FP8 (and the logits alone), FP8's agreement
                                 with bf16, the chunked twin, plain PyTorch (all-head einsum + topk; it runs out
                                 of memory past 16K), and with --public-indexer the public TileLang FP8 kernels
  sparse_gqa fwd / bwd           sparse GQA at Qwen3-32B's attention shape (64 query heads over 8 key heads of
                                 128, top-2048), beside SDPA's dense causal GQA (FlashAttention) at that shape;
                                 TF/s over the FLOPs each really does (sparse: valid selections only)
"""

from __future__ import annotations

import functools

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
                     backends=("triton", "tilelang"), cudnn: bool = False, flashmla: bool = False) -> list[dict]:
    """`public`: the directory of the public TileLang kernels to time beside ours (`bench/public.py`);
    `backends`: the kernels timed, of those the machine runs; `cudnn`: time cuDNN's backward beside TileLang's
    (`bench/cudnn.py`); `flashmla`: FlashMLA's forward beside TileLang's."""
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
        if flashmla and name == "tilelang":
            rows += bench_flashmla(k, q, kv, idx, scale, iters, fwd_flops)
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


def bench_flashmla(ours, q, kv, idx, scale: float, iters: int, flops: float) -> list[dict]:
    """FlashMLA's SM90 sparse forward (what `DSA_KERNELS=auto` runs where it is installed) on the same inputs as
    `ours`, its output and log-sum-exp compared with ours."""
    from bench.common import failed_row, rel_diff
    from train.ops import flashmla_sparse_mla

    name = "sparse_mla flashmla fwd"
    try:
        out, lse = flashmla_sparse_mla.sparse_mla_forward(q, kv, idx, scale, DV)
        out_ours, lse_ours = ours.sparse_mla_forward(q, kv, idx, scale, DV)
        diff = {"out_rel_diff_vs_ours": rel_diff(out, out_ours), "lse_rel_diff_vs_ours": rel_diff(lse, lse_ours)}
        del out, lse, out_ours, lse_ours
    except Exception as e:  # noqa: BLE001 -- not installed, or it does not run here: one error row
        return [failed_row(name, e)]
    row = guarded(name, lambda: flashmla_sparse_mla.sparse_mla_forward(q, kv, idx, scale, DV), iters, flops)
    return [{**row, **diff}]


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


def bench_topk(L: int, iters: int, twin_max: int, plain_max: int, public_indexer: str | None = None) -> list[dict]:
    """The indexer's top-k in bf16 and in FP8 (and the logits alone: what the selection adds), the FP8
    selection's agreement with bf16's, the twin and plain PyTorch; `public_indexer`: the public TileLang FP8
    kernels' directory (`bench/public_indexer.py`)."""
    dev = "cuda"
    q = torch.randn(1, L, G, DI, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, L, DI, device=dev, dtype=torch.bfloat16)
    w = torch.randn(1, L, G, device=dev) * (G * DI) ** -0.5
    flops = 2 * G * DI * L * (L + 1) / 2
    from train.ops import triton_topk

    def logits_only(fp8: bool):
        block = triton_topk.query_rows(L, TOPK)
        k_, ks = reference.fp8_indexer_keys(k) if fp8 else (k, None)
        for t0 in range(0, L, block):
            q_, w_ = q[:, t0 : t0 + block], w[:, t0 : t0 + block]
            if fp8:
                q_, w_ = reference.fp8_indexer_queries(q_, w_)
            triton_topk.logit_keys(q_, k_[:, : t0 + block], w_, t0, None if ks is None else ks[:, : t0 + block])
    rows = [guarded("indexer_topk triton", lambda: triton_topk.indexer_topk(q, k, w, TOPK), iters, flops),
            guarded("indexer_topk triton fp8", lambda: triton_topk.indexer_topk(q, k, w, TOPK, fp8=True), iters,
                    flops),
            guarded("indexer_topk triton logits only", lambda: logits_only(False), iters, flops),
            guarded("indexer_topk triton fp8 logits only", lambda: logits_only(True), iters, flops)]
    rows[1].update(fp8_agreement(q, k, w))
    from train.ops import cudnn_topk

    if cudnn_topk.importable():  # what `auto` runs where the cuDNN frontend is installed
        for fp8 in (False, True):
            name = "indexer_topk triton" + (" fp8" if fp8 else "") + ", cuDNN selection"
            run = functools.partial(triton_topk.indexer_topk, q, k, w, TOPK, fp8=fp8, select=cudnn_topk.select)
            rows.append(guarded(name, run, iters, flops))
            rows[-1]["same_as_triton_selection"] = bool(torch.equal(run(), triton_topk.indexer_topk(
                q, k, w, TOPK, fp8=fp8)))
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
    if public_indexer:  # last: their kernels have faulted on these inputs, which spoils every later CUDA call
        from bench.public_indexer import bench_public_indexer

        rows += bench_public_indexer(public_indexer, q, k, w, TOPK, iters, flops)
    return rows


def fp8_agreement(q, k, w, samples: int = 64) -> dict:
    """How the FP8 top-k's selection compares with bf16's on `samples` rows past the first TOPK: the share of
    bf16's positions it keeps, and the share of the bf16 logits' softmax mass it holds against bf16's own."""
    from train.ops import triton_topk

    L = q.shape[1]
    bf16, fp8 = (triton_topk.indexer_topk(q, k, w, TOPK, fp8=f)[0] for f in (False, True))
    kept = mass = mass_bf16 = 0.0
    for t in torch.linspace(TOPK, L - 1, samples).long().tolist():
        p = reference.indexer_logits(q[:, t : t + 1], k[:, : t + 1], w[:, t : t + 1], t)[0, 0].softmax(-1)
        kept += len(set(bf16[t].tolist()) & set(fp8[t].tolist())) / TOPK
        mass += p[fp8[t]].sum().item()
        mass_bf16 += p[bf16[t]].sum().item()
    return {"fp8_kept_of_bf16_selection": kept / samples, "fp8_selected_mass_over_bf16s": mass / mass_bf16}
