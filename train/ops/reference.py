"""Chunked PyTorch implementations of the DSA hot paths: the oracle every fast kernel is tested against.

Every function walks the queries in blocks, so no [L, L] (or [H, L, L]) tensor for a whole sequence ever
exists; backward passes recompute each block instead of keeping it (see `_QueryBlocks`).

Dimension legend: B batch, T query positions (a block of them), S key positions, L sequence length,
H attention heads, G indexer heads, D head dim, K selected tokens per query, V value dim.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

# Elements (of the largest per-block intermediate) a query block may hold: 2**20 fp32 = 4 MiB on CPU;
# 2**26 (256 MiB) on a GPU, where small blocks would leave the device idle between Python iterations.
DEFAULT_BLOCK_ELEMS = 1 << 20
GPU_BLOCK_ELEMS = 1 << 26


def query_block_size(num_queries: int, elems_per_query: int, block_elems: int | None = None,
                     device: torch.device | None = None) -> int:
    """Largest query block whose widest intermediate holds at most `block_elems` elements (default: by device)."""
    if block_elems is None:
        block_elems = GPU_BLOCK_ELEMS if device is not None and device.type == "cuda" else DEFAULT_BLOCK_ELEMS
    return max(1, min(num_queries, block_elems // max(1, elems_per_query)))


class _QueryBlocks(torch.autograd.Function):
    """Runs `fn` on query blocks; backward recomputes each block under autograd (activation checkpointing).

    `fn(t0, *query_args_block, *full_args)` returns a tuple whose first `num_diff` entries are
    differentiable [B, T, ...] tensors; the rest are auxiliary outputs (no gradient). Query args are
    sliced along dim 1; full args (keys) are passed whole.
    """

    @staticmethod
    def forward(ctx, fn, block, num_query_args, num_diff, *args):
        num_queries = args[0].shape[1]
        pieces = []
        with torch.no_grad():
            for t0 in range(0, num_queries, block):
                q_args = [a[:, t0 : t0 + block] for a in args[:num_query_args]]
                pieces.append(fn(t0, *q_args, *args[num_query_args:]))
        outs = tuple(torch.cat(list(p), dim=1) for p in zip(*pieces))
        ctx.fn, ctx.block, ctx.num_query_args, ctx.num_diff = fn, block, num_query_args, num_diff
        ctx.save_for_backward(*args)
        ctx.mark_non_differentiable(*outs[num_diff:])
        return outs

    @staticmethod
    def backward(ctx, *grad_outs):
        args = ctx.saved_tensors
        nq, block = ctx.num_query_args, ctx.block
        wants = ctx.needs_input_grad[4:]
        grads = [torch.zeros_like(a) if w else None for a, w in zip(args, wants)]
        full = [a.detach().requires_grad_(w) for a, w in zip(args[nq:], wants[nq:])]
        for t0 in range(0, args[0].shape[1], block):
            q_args = [a[:, t0 : t0 + block].detach().requires_grad_(w) for a, w in zip(args[:nq], wants[:nq])]
            with torch.enable_grad():
                outs = ctx.fn(t0, *q_args, *full)[: ctx.num_diff]
                inputs = [x for x in q_args + full if x.requires_grad]
                block_grads = torch.autograd.grad(
                    outs, inputs, [g[:, t0 : t0 + block] for g in grad_outs[: ctx.num_diff]], allow_unused=True
                )
            it = iter(block_grads)
            for i, x in enumerate(q_args + full):
                if not x.requires_grad:
                    continue
                g = next(it)
                if g is None:
                    continue
                if i < nq:
                    grads[i][:, t0 : t0 + block] += g
                else:
                    grads[i] += g
        return (None, None, None, None, *grads)


def _gather_rows(x_BSD: torch.Tensor, idx_BTK: torch.Tensor) -> torch.Tensor:
    """x[b, idx[b, t, k]] -> [B, T, K, D]; negative (invalid) indices read row 0 and must be masked by the caller."""
    B, T, K = idx_BTK.shape
    flat = idx_BTK.clamp(min=0).reshape(B, T * K, 1).expand(-1, -1, x_BSD.shape[-1])
    return torch.gather(x_BSD, 1, flat).view(B, T, K, x_BSD.shape[-1])


def _causal_mask(t0: int, num_queries: int, num_keys: int, device) -> torch.Tensor:
    """[T, S] bool, True where key s is visible to query t0 + t."""
    t = torch.arange(t0, t0 + num_queries, device=device)[:, None]
    return torch.arange(num_keys, device=device)[None, :] <= t


def indexer_logits(q_BTGD: torch.Tensor, k_BSD: torch.Tensor, w_BTG: torch.Tensor, t0: int) -> torch.Tensor:
    """I[b, t, s] = sum_g w[b, t, g] * relu(q[b, t, g] . k[b, s]), -inf for s > t0 + t. Computed in fp32.

    `w` already carries the G**-0.5 * D**-0.5 factors (see Indexer.forward).
    """
    scores_BTGS = torch.einsum("btgd,bsd->btgs", q_BTGD.float(), k_BSD.float()).relu()
    logits_BTS = torch.einsum("btgs,btg->bts", scores_BTGS, w_BTG.float())
    visible_TS = _causal_mask(t0, q_BTGD.shape[1], k_BSD.shape[1], q_BTGD.device)
    return logits_BTS.masked_fill(~visible_TS, float("-inf"))


@torch.no_grad()
def indexer_topk(
    q_BLGD: torch.Tensor, k_BSD: torch.Tensor, w_BLG: torch.Tensor, topk: int, block_elems: int | None = None,
    q_offset: int = 0,
) -> torch.Tensor:
    """Top-k key positions per query over the causal span: [B, L, min(topk, S)] int64, -1 where t + 1 < k.

    Query t sits at position q_offset + t among the S keys (a piece of a longer sequence: context parallelism).
    Indices of a row come in descending logit order; ties go to the lower position (`topk_stable`).
    """
    B, L, G, _ = q_BLGD.shape
    K = min(topk, k_BSD.shape[1])
    block = query_block_size(L, B * G * (q_offset + L), block_elems, q_BLGD.device)
    out = torch.empty(B, L, K, dtype=torch.long, device=q_BLGD.device)
    for t0 in range(0, L, block):
        t1 = min(L, t0 + block)
        logits_BTS = indexer_logits(q_BLGD[:, t0:t1], k_BSD[:, : q_offset + t1], w_BLG[:, t0:t1], q_offset + t0)
        if logits_BTS.shape[-1] < K:
            logits_BTS = F.pad(logits_BTS, (0, K - logits_BTS.shape[-1]), value=float("-inf"))
        vals, idx = topk_stable(logits_BTS, K)
        out[:, t0:t1] = idx.masked_fill(vals == float("-inf"), -1)
    return out


FP8_MAX = 448.0  # the largest finite float8 e4m3fn value


@functools.cache
def hadamard(d: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The orthonormal Hadamard matrix of order d (a power of two; Sylvester's construction, scaled by d**-0.5)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h * d**-0.5).to(device=device, dtype=dtype)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x in float8 e4m3 per vector along the last dim, with a power-of-two scale (DeepSeek's ue8m0 format):
    (x8, scale) with x ~ x8 * scale[..., None]; scale = 2**ceil(log2(amax / 448)), amax at least 1e-4."""
    amax = x.abs().amax(-1, keepdim=True).float().clamp_min(1e-4)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    return (x.float() / scale).to(torch.float8_e4m3fn), scale.squeeze(-1)


def fp8_indexer_keys(k_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 indexer's keys as DeepSeek computes them: Hadamard-rotated (dot products unchanged, outliers
    spread over the dims), then e4m3 per token: (k8 [B, S, D], scale [B, S] fp32)."""
    return quantize_fp8(k_BSD @ hadamard(k_BSD.shape[-1], k_BSD.device, k_BSD.dtype))


def fp8_indexer_keys_dequantised(k_BSD: torch.Tensor) -> torch.Tensor:
    """`fp8_indexer_keys` as fp32 values, k8 * scale: exact (the scales are powers of two)."""
    k8_BSD, ks_BS = fp8_indexer_keys(k_BSD)
    return k8_BSD.float() * ks_BS[..., None]


def fp8_indexer_queries(q_BTGD: torch.Tensor, w_BTG: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 indexer's queries, rotated and quantised per (token, head) like the keys, with each head's scale
    folded into its weight: (q8 [B, T, G, D], w * scale [B, T, G] fp32). Then (scales being positive)
    I[t, s] = k_scale[s] * sum_g w8[t, g] relu(q8[t, g] . k8[s])."""
    q8, scale = quantize_fp8(q_BTGD @ hadamard(q_BTGD.shape[-1], q_BTGD.device, q_BTGD.dtype))
    return q8, w_BTG.float() * scale


@torch.no_grad()
def indexer_topk_fp8(q_BLGD: torch.Tensor, k_BSD: torch.Tensor, w_BLG: torch.Tensor, topk: int,
                     block_elems: int | None = None, q_offset: int = 0) -> torch.Tensor:
    """`indexer_topk` of the FP8 indexer (DeepSeek's inference form): the logits of the e4m3 queries and keys
    with their scales (`fp8_indexer_keys`, `fp8_indexer_queries`), computed exactly in fp32. The scales are
    powers of two, so the dequantised keys are exact and only the kernels' summation order can differ."""
    kf_BSD = fp8_indexer_keys_dequantised(k_BSD)
    B, L, G, _ = q_BLGD.shape
    block = query_block_size(L, B * G * (q_offset + L), block_elems, q_BLGD.device)
    out = torch.empty(B, L, min(topk, k_BSD.shape[1]), dtype=torch.long, device=q_BLGD.device)
    for t0 in range(0, L, block):
        q8_BTGD, w8_BTG = fp8_indexer_queries(q_BLGD[:, t0 : t0 + block], w_BLG[:, t0 : t0 + block])
        out[:, t0 : t0 + block] = indexer_topk(q8_BTGD, kf_BSD, w8_BTG, topk, block_elems, q_offset + t0)
    return out


def topk_stable(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim with a fixed tie rule (the lower position wins), whatever the row length.

    relu makes exact ties common (every head's score clipped to 0); a fixed rule keeps the selected set
    independent of block sizes, ranks and backends.
    """
    vals, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    return vals[..., :k], idx[..., :k]


def _kl_terms(p: torch.Tensor, logq: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """sum over the last dim of p * (log p - log q), counting only valid entries (0 * log 0 = 0)."""
    terms = torch.xlogy(p, p) - p * logq.masked_fill(~valid, 0.0)
    return terms.masked_fill(~valid, 0.0).sum(-1)


def _dense_kl_block(t0, qi_BTGD, wi_BTG, qa_BTHD, ki_BSD, ka_BSHD, k8_BSD, scale, topk):
    T = qi_BTGD.shape[1]
    S = t0 + T  # keys past the block's last query are invisible to all of it
    ki_BSD, ka_BSHD = ki_BSD[:, :S], ka_BSHD[:, :S]
    visible_TS = _causal_mask(t0, T, S, qi_BTGD.device)

    logits_BTS = indexer_logits(qi_BTGD, ki_BSD, wi_BTG, t0)
    logq_BTS = torch.log_softmax(logits_BTS, dim=-1)

    with torch.no_grad():  # the target is a constant: attention inputs are detached
        B, _, H, D = qa_BTHD.shape
        J = ka_BSHD.shape[2]  # key heads: H (MHA, MLA's per-head form) or H / group (GQA)
        qa_BTJRD = qa_BTHD.float().view(B, T, J, H // J, D)
        att_BJRTS = torch.einsum("btjrd,bsjd->bjrts", qa_BTJRD, ka_BSHD.float()) * scale
        att_BJRTS = att_BJRTS.masked_fill(~visible_TS, float("-inf")).softmax(dim=-1)
        p_BTS = att_BJRTS.mean(dim=(1, 2))  # head sum, L1-normalised: each head's row sums to 1
        k = min(topk, S)
        if k8_BSD is not None:  # the selection the sparse stage would make: the FP8 indexer's (dequantised keys)
            q8_BTGD, w8_BTG = fp8_indexer_queries(qi_BTGD.detach(), wi_BTG.detach())
            top_BTK = topk_stable(indexer_logits(q8_BTGD, k8_BSD[:, :S], w8_BTG, t0), k)[1]
        else:
            top_BTK = topk_stable(logits_BTS, k)[1]
        recall_BT = p_BTS.gather(-1, top_BTK).sum(-1)  # invisible picks carry p = 0

    kl_BT = _kl_terms(p_BTS, logq_BTS, visible_TS.expand_as(p_BTS))
    return kl_BT, recall_BT


def dense_indexer_kl(
    qi_BLGD: torch.Tensor,
    ki_BLD: torch.Tensor,
    wi_BLG: torch.Tensor,
    qa_BLHD: torch.Tensor,
    ka_BLHD: torch.Tensor,
    scale: float,
    topk: int,
    block_elems: int | None = None,
    q_offset: int = 0,
    fp8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warm-up loss per query: KL(p_t || softmax(I_t)) over the full causal span, and the indexer's recall.

    p_t is the head-averaged dense attention of queries `qa` [B, L, H, D] over keys `ka` [B, S, J, D] with
    softmax scale `scale`: J = H (MHA, MLA's per-head form) or a divisor of H (GQA: query head h reads key head
    h // (H / J)); recall is the share of p_t inside the indexer's top-`topk` (with `fp8`, the top-k of the FP8
    indexer's logits, `indexer_topk_fp8`; the KL's are always the weights' own). Query t sits
    at position q_offset + t among the keys (context parallelism: a piece of a longer sequence).
    Returns (kl [B, L] fp32, differentiable w.r.t. qi, ki, wi; recall [B, L] fp32, no gradient).
    """
    B, L, H, _ = qa_BLHD.shape
    block = query_block_size(L, B * max(H, qi_BLGD.shape[2]) * (q_offset + L), block_elems, qi_BLGD.device)
    k8_BSD = fp8_indexer_keys_dequantised(ki_BLD.detach()) if fp8 else None  # once for every block
    fn = lambda t0, qi, wi, qa, ki, ka: _dense_kl_block(q_offset + t0, qi, wi, qa, ki, ka, k8_BSD,  # noqa: E731
                                                        scale, topk)
    return _QueryBlocks.apply(fn, block, 3, 1, qi_BLGD, wi_BLG, qa_BLHD.detach(), ki_BLD, ka_BLHD.detach())


def _sparse_mla_block(t0, q_BTHD, idx_BTK, kv_BSD, scale, v_dim):
    valid_BTK = idx_BTK >= 0
    kv_BTKD = _gather_rows(kv_BSD, idx_BTK).float()
    s_BTHK = torch.einsum("bthd,btkd->bthk", q_BTHD.float(), kv_BTKD) * scale
    # A query with no selection (a row of -1) gets zero output and zero gradients, as in the kernel: its
    # scores stay finite, so softmax makes no NaN, and the mask below zeroes its probabilities.
    any_BT1 = valid_BTK.any(-1, keepdim=True)
    s_BTHK = s_BTHK.masked_fill((~valid_BTK & any_BT1)[:, :, None, :], float("-inf"))
    p_BTHK = s_BTHK.softmax(dim=-1).masked_fill(~valid_BTK[:, :, None, :], 0.0)
    out_BTHV = torch.einsum("bthk,btkv->bthv", p_BTHK, kv_BTKD[..., :v_dim]).to(q_BTHD.dtype)
    # log-sum-exp from the softmax already taken: p_max = exp(s_max - lse), and p_max >= 1/K (no underflow);
    # a query with no selection has p = 0, so lse = +inf, as in the kernel
    with torch.no_grad():
        lse_BTH = s_BTHK.amax(dim=-1) - p_BTHK.amax(dim=-1).log()
    return out_BTHV, p_BTHK.mean(dim=2).detach(), lse_BTH


def sparse_mla(
    q_BLHD: torch.Tensor,
    kv_BLD: torch.Tensor,
    idx_BLK: torch.Tensor,
    scale: float,
    v_dim: int,
    lse_BLH: torch.Tensor | None = None,
    block_elems: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse MLA in MQA (absorbed) form: query t attends to latent rows idx[t] (-1 = none), shared by all heads.
    A query with no selection at all gets a zero output.

    kv holds [latent | rope key] per token (d_qk wide); its first `v_dim` dims are the values.
    Returns (out [B, L, H, v_dim], differentiable w.r.t. q and kv; p [B, L, K] fp32, the head-averaged
    attention over the selected rows, which the sparse indexer loss uses as its target; lse [B, L, H] fp32,
    each head's log-sum-exp of its scaled scores over the selection, +inf for a query with none).
    `lse_BLH`, the lse of an earlier call on the same inputs (the checkpoint recomputation), lets the kernel
    compute out and p in one pass; this twin does not need it.
    """
    B, L, H, D = q_BLHD.shape
    K = idx_BLK.shape[-1]
    block = query_block_size(L, B * K * max(H, D), block_elems, q_BLHD.device)
    fn = lambda t0, q, idx, kv: _sparse_mla_block(t0, q, idx, kv, scale, v_dim)  # noqa: E731
    return _QueryBlocks.apply(fn, block, 2, 1, q_BLHD, idx_BLK, kv_BLD)


def _sparse_gqa_block(t0, q_BTHD, idx_BTK, k_BSJD, v_BSJV, scale):
    B, T, H, D = q_BTHD.shape
    J = k_BSJD.shape[2]
    valid_BTK = idx_BTK >= 0
    k_BTKJD = _gather_rows(k_BSJD.flatten(2), idx_BTK).float().unflatten(-1, (J, D))
    v_BTKJV = _gather_rows(v_BSJV.flatten(2), idx_BTK).float().unflatten(-1, (J, -1))
    q_BTJRD = q_BTHD.float().view(B, T, J, H // J, D)
    s_BTJRK = torch.einsum("btjrd,btkjd->btjrk", q_BTJRD, k_BTKJD) * scale
    any_BT1 = valid_BTK.any(-1, keepdim=True)  # a query with no selection: zero output, as in `_sparse_mla_block`
    s_BTJRK = s_BTJRK.masked_fill((~valid_BTK & any_BT1)[:, :, None, None, :], float("-inf"))
    p_BTJRK = s_BTJRK.softmax(dim=-1).masked_fill(~valid_BTK[:, :, None, None, :], 0.0)
    out_BTHV = torch.einsum("btjrk,btkjv->btjrv", p_BTJRK, v_BTKJV).flatten(2, 3).to(q_BTHD.dtype)
    with torch.no_grad():
        lse_BTH = (s_BTJRK.amax(dim=-1) - p_BTJRK.amax(dim=-1).log()).flatten(2)
    return out_BTHV, p_BTJRK.mean(dim=(2, 3)).detach(), lse_BTH


def sparse_gqa(
    q_BLHD: torch.Tensor,
    k_BSJD: torch.Tensor,
    v_BSJV: torch.Tensor,
    idx_BLK: torch.Tensor,
    scale: float,
    lse_BLH: torch.Tensor | None = None,
    block_elems: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse grouped-query attention: query t attends to keys idx[t] (-1 = none), one selection for all heads;
    query head h reads key and value head h // (H / J). The contract of `sparse_mla` with separate keys
    [B, S, J, D] and values [B, S, J, V]: (out [B, L, H, V]; p [B, L, K] fp32, the head-averaged attention over the
    selection; lse [B, L, H] fp32, +inf for a query with no selection). `lse_BLH` is accepted for the kernels'
    one-pass recomputation and not needed here."""
    B, L, H, D = q_BLHD.shape
    K, J = idx_BLK.shape[-1], k_BSJD.shape[2]
    block = query_block_size(L, B * K * max(H, J * (D + v_BSJV.shape[-1])), block_elems, q_BLHD.device)
    fn = lambda t0, q, idx, k, v: _sparse_gqa_block(t0, q, idx, k, v, scale)  # noqa: E731
    return _QueryBlocks.apply(fn, block, 2, 1, q_BLHD, idx_BLK, k_BSJD, v_BSJV)


def _sparse_kl_block(t0, qi_BTGD, wi_BTG, idx_BTK, p_BTK, ki_BSD):
    valid_BTK = idx_BTK >= 0
    k_BTKD = _gather_rows(ki_BSD, idx_BTK).float()
    scores_BTGK = torch.einsum("btgd,btkd->btgk", qi_BTGD.float(), k_BTKD).relu()
    logits_BTK = torch.einsum("btgk,btg->btk", scores_BTGK, wi_BTG.float())
    logq_BTK = torch.log_softmax(logits_BTK.masked_fill(~valid_BTK, float("-inf")), dim=-1)
    return (_kl_terms(p_BTK.float(), logq_BTK, valid_BTK),)


def sparse_indexer_kl(
    qi_BLGD: torch.Tensor,
    ki_BLD: torch.Tensor,
    wi_BLG: torch.Tensor,
    idx_BLK: torch.Tensor,
    p_BLK: torch.Tensor,
    block_elems: int | None = None,
) -> torch.Tensor:
    """Sparse-stage indexer loss per query: KL(p_t || softmax(I_t)) over the selected set idx[t] only.

    p [B, L, K] is the head-averaged main attention over the selected set (sums to 1 over valid entries).
    Returns kl [B, L] fp32, differentiable w.r.t. qi, ki, wi.
    """
    B, L, G, D = qi_BLGD.shape
    K = idx_BLK.shape[-1]
    block = query_block_size(L, B * K * max(G, D), block_elems, qi_BLGD.device)
    (kl_BL,) = _QueryBlocks.apply(_sparse_kl_block, block, 4, 1, qi_BLGD, wi_BLG, idx_BLK, p_BLK.detach(), ki_BLD)
    return kl_BL


def dense_attention(q_BLHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHV: torch.Tensor, scale: float,
                    q_offset: int = 0) -> torch.Tensor:
    """Causal softmax attention through SDPA (flash/memory-efficient kernels: no [L, L] tensor). Query t sits at
    position q_offset + t among the keys (context parallelism); it sees keys 0..q_offset + t. Keys and values
    may have fewer heads than the queries (GQA: a divisor of them)."""
    S = q_offset + q_BLHD.shape[1]
    q, k, v = q_BLHD.transpose(1, 2), k_BSHD[:, :S].transpose(1, 2), v_BSHV[:, :S].transpose(1, 2)
    gqa = k.shape[1] != q.shape[1]
    if q_offset == 0:
        out_BHLV = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:  # the causal mask aligned to the last key, without materialising it
        out_BHLV = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], S), scale=scale,
                                                  enable_gqa=gqa)
    return out_BHLV.transpose(1, 2)


# The naive formulas: whole [B, (H,) L, L] matrices, small shapes only (tests/unit/test_ops.py checks the chunked
# twins above against them, forward and backward). Each is the definition written as directly as it can be.

def naive_indexer_logits(qi_BLGD: torch.Tensor, ki_BLD: torch.Tensor, wi_BLG: torch.Tensor) -> torch.Tensor:
    """I[b, t, s] = sum_g w[b, t, g] relu(q[b, t, g] . k[b, s]) for s <= t, else -inf: [B, L, L]."""
    L = qi_BLGD.shape[1]
    logits = torch.einsum("btg,btgs->bts", wi_BLG, torch.einsum("btgd,bsd->btgs", qi_BLGD, ki_BLD).relu())
    return logits.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=logits.device).tril(), float("-inf"))


def naive_head_summed_attention(qa_BLHD: torch.Tensor, ka_BLJD: torch.Tensor, scale: float) -> torch.Tensor:
    """The warm-up target: causal softmax attention of every query head (head h reads key head h // (H / J)),
    summed over heads and L1-normalised: [B, L, L]."""
    L, H, J = qa_BLHD.shape[1], qa_BLHD.shape[2], ka_BLJD.shape[2]
    causal = torch.ones(L, L, dtype=torch.bool, device=qa_BLHD.device).tril()
    k_BLHD = ka_BLJD.repeat_interleave(H // J, dim=2)
    att = (torch.einsum("bthd,bshd->bhts", qa_BLHD, k_BLHD) * scale).masked_fill(~causal, float("-inf")).softmax(-1)
    return att.sum(1) / att.sum(1).sum(-1, keepdim=True)


def naive_kl(p_BLS: torch.Tensor, logits_BLS: torch.Tensor, valid_BLS: torch.Tensor) -> torch.Tensor:
    """sum over valid s of p (log p - log softmax(logits)): [B, L]."""
    logq = logits_BLS.log_softmax(-1)
    return torch.where(valid_BLS, p_BLS * (p_BLS.clamp_min(1e-30).log() - logq), 0.0).sum(-1)


def naive_sparse_attention(q_BLHD: torch.Tensor, k_BLJD: torch.Tensor, v_BLJV: torch.Tensor, idx_BLK: torch.Tensor,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention masked to each query's selection (head h reads key head h // (H / J); MLA's absorbed form
    is J = 1 with v = the latent part of k): (out [B, L, H, V], the attention [B, H, L, L]). A query with no
    selection gets zeros."""
    B, L, H, _ = q_BLHD.shape
    J = k_BLJD.shape[2]
    selected = torch.zeros(B, L, L, device=q_BLHD.device).scatter_add_(
        -1, idx_BLK.clamp(min=0), (idx_BLK >= 0).float()) > 0
    k_BLHD, v_BLHV = k_BLJD.repeat_interleave(H // J, dim=2), v_BLJV.repeat_interleave(H // J, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q_BLHD, k_BLHD) * scale
    probs = scores.masked_fill(~selected[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("bhts,bshv->bthv", probs, v_BLHV), probs
