"""The autograd wrappers every sparse attention backend shares: which kernels run in forward, recomputation and
backward."""

from __future__ import annotations

import torch


def sparse_mla_function(kernels):
    """A torch.autograd.Function over a backend module's four kernels (the contract of `reference.sparse_mla`):
    `sparse_mla_forward` gives (out, lse), then `sparse_mla_probs` gives p from lse (with probs=False, not run:
    p is `no_probs`); given an earlier lse (the checkpoint recomputation) `sparse_mla_forward_given_lse` gives
    (out, p) in one pass; `sparse_mla_backward` gives (dq, dkv) from the saved out and lse. Looked up at each call
    (tests may wrap them)."""

    class SparseMLA(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, kv, idx, scale, v_dim, lse, probs):
            q, kv, idx = q.contiguous(), kv.contiguous(), idx.contiguous()
            if lse is None:
                out, lse = kernels.sparse_mla_forward(q, kv, idx, scale, v_dim)
                p = kernels.sparse_mla_probs(q, kv, idx, lse, scale, v_dim) if probs else no_probs(idx)
            else:
                lse = lse.clone()  # an output of its own (the caller's tensor is an input)
                out, p = kernels.sparse_mla_forward_given_lse(q, kv, idx, lse, scale, v_dim)
            ctx.save_for_backward(q, kv, idx, out, lse)
            ctx.scale, ctx.v_dim = scale, v_dim
            ctx.mark_non_differentiable(p, lse)
            return out, p, lse

        @staticmethod
        def backward(ctx, grad_out, _grad_p, _grad_lse):
            q, kv, idx, out, lse = ctx.saved_tensors
            dq, dkv = kernels.sparse_mla_backward(q, kv, idx, out, lse, grad_out, ctx.scale, ctx.v_dim)
            return dq, dkv, None, None, None, None, None

    return SparseMLA


def sparse_gqa_function(kernels):
    """The torch.autograd.Function over a sparse GQA backend's four kernels (the contract of
    `reference.sparse_gqa`), with the same passes as `sparse_mla_function`: (out, lse), then p (unless probs=False);
    (out, p) in one pass given an earlier lse; (dq, dk, dv) from the saved out and lse."""

    class SparseGQA(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, idx, scale, lse, probs):
            q, k, v, idx = q.contiguous(), k.contiguous(), v.contiguous(), idx.contiguous()
            if lse is None:
                out, lse = kernels.sparse_gqa_forward(q, k, v, idx, scale)
                p = kernels.sparse_gqa_probs(q, k, v, idx, lse, scale) if probs else no_probs(idx)
            else:
                lse = lse.clone()
                out, p = kernels.sparse_gqa_forward_given_lse(q, k, v, idx, lse, scale)
            ctx.save_for_backward(q, k, v, idx, out, lse)
            ctx.scale = scale
            ctx.mark_non_differentiable(p, lse)
            return out, p, lse

        @staticmethod
        def backward(ctx, grad_out, _grad_p, _grad_lse):
            q, k, v, idx, out, lse = ctx.saved_tensors
            dq, dk, dv = kernels.sparse_gqa_backward(q, k, v, idx, out, lse, grad_out, ctx.scale)
            return dq, dk, dv, None, None, None, None

    return SparseGQA


def no_probs(idx_BLK: torch.Tensor) -> torch.Tensor:
    """What a pass that skips the attention probabilities returns for p: zeros of p's shape [B, L, K] and dtype
    (fp32), one element of memory."""
    return torch.zeros((), dtype=torch.float32, device=idx_BLK.device).expand(idx_BLK.shape)


class DeferredSparseIndexerKL(torch.autograd.Function):
    """The sparse-stage indexer KL of a checkpointed layer, computed in backward.

    Under activation checkpointing the backward takes every tensor it needs from the layer's recomputation, which
    gets the attention probabilities (the KL's target) in its one pass. The forward's probabilities would serve
    only the KL's value, so the forward computes neither them nor the KL: this Function saves its inputs (in the
    forward p is `no_probs`; the checkpoint swaps in the recomputation's, saved by this same Function in the same
    order, shape and dtype) and returns a view of `value_BL`, zeros until backward. Backward runs `kl_fn` (the
    backend's KL) forward and backward on the recomputed tensors and writes the KL into `value_BL`."""

    @staticmethod
    def forward(ctx, kl_fn, qi, ki, wi, idx, p, value_BL):
        ctx.save_for_backward(qi, ki, wi, idx, p)
        ctx.kl_fn, ctx.value_BL = kl_fn, value_BL
        return value_BL.view_as(value_BL)

    @staticmethod
    def backward(ctx, d_kl):
        qi, ki, wi, idx, p = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_(need) for x, need in zip((qi, ki, wi), ctx.needs_input_grad[1:4])]
            kl = ctx.kl_fn(*inputs, idx, p)
            grads = iter(torch.autograd.grad(kl, [x for x in inputs if x.requires_grad], d_kl))
        ctx.value_BL.copy_(kl.detach())
        return (None, *[next(grads) if x.requires_grad else None for x in inputs], None, None, None)


class ComposedSparseMLA:
    """Sparse MLA's kernels from several backends as one kernels object (the contract `sparse_mla_function` and
    `AbsorbedSparseMLA` call): `sparse_mla_forward` from `forward`, `sparse_mla_backward` from `backward` (modules
    with that function; None: `base`'s), and every other kernel (the probabilities, the one-pass checkpoint
    recomputation) from `base`. The vendor kernels (FlashMLA's forward, cuDNN's backward) provide only their own
    pass. Kernels are looked up at each call (tests may wrap them)."""

    def __init__(self, base, forward=None, backward=None):
        self.base, self.forward_from, self.backward_from = base, forward, backward
        self._function = sparse_mla_function(self)

    def __getattr__(self, name):  # every other kernel: base's
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def sparse_mla_forward(self, *args, **kwargs):
        return (self.forward_from or self.base).sparse_mla_forward(*args, **kwargs)

    def sparse_mla_backward(self, *args, **kwargs):
        return (self.backward_from or self.base).sparse_mla_backward(*args, **kwargs)

    def sparse_mla(self, q_BLHD, kv_BLD, idx_BLK, scale: float, v_dim: int, lse_BLH=None, probs: bool = True):
        """Same contract as `ops.sparse_mla`."""
        return self._function.apply(q_BLHD, kv_BLD, idx_BLK, scale, v_dim, lse_BLH, probs)


def absorbed_query(q_nope_BLHN: torch.Tensor, q_rope_BLHR: torch.Tensor, w_uk_HNA: torch.Tensor) -> torch.Tensor:
    """MLA's query in absorbed form: [q_nope · W_UK | q_rope], [B, L, H, A + R] (differentiable: the twin's)."""
    return torch.cat((torch.einsum("blhn,hna->blha", q_nope_BLHN, w_uk_HNA), q_rope_BLHR), dim=-1)


def _absorbed_query_into(q_nope_BLHN: torch.Tensor, q_rope_BLHR: torch.Tensor, w_uk_HNA: torch.Tensor) -> torch.Tensor:
    """`absorbed_query` as a new contiguous tensor, each token's q_nope · W_UK written in place by one batched GEMM
    over heads: no layout copy, no concatenation pass (inside autograd Functions: out= records no graph)."""
    B, L, H, _ = q_nope_BLHN.shape
    A, R = w_uk_HNA.shape[-1], q_rope_BLHR.shape[-1]
    q_BLHD = q_nope_BLHN.new_empty(B, L, H, A + R)
    for b in range(B):
        torch.bmm(_by_head(q_nope_BLHN[b]), w_uk_HNA, out=_by_head(q_BLHD[b, :, :, :A]))
    q_BLHD[..., A:] = q_rope_BLHR
    return q_BLHD


def _by_head(x_LHX: torch.Tensor) -> torch.Tensor:
    """[L, H, X] seen as [H, L, X] (a view: per-head matrices whose rows sit H * X apart, as cuBLAS takes them)."""
    return x_LHX.transpose(0, 1)


def _bmm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b per batch with an fp32 result: on CUDA from bf16 operands with fp32 accumulation (no fp32 copies)."""
    if a.is_cuda:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


class AbsorbedSparseMLA(torch.autograd.Function):
    """Sparse MLA from MLA's own query parts and weights, in chunks of queries, so that the absorbed queries
    [L, H, A + R], the latent outputs' gradient and the queries' gradient exist one chunk at a time.

    out_V = (sparse attention of [q_nope · W_UK | q_rope] over the selected latent rows) · W_UV, per head.
    Kept for backward: the query parts, the latent rows, the selection and the log-sum-exp. Not the latent
    outputs [L, H, A]: at 128 heads they are 4x the size of the per-head outputs (16 GiB a layer at 128K
    tokens), more than the whole working set of dense attention. The backward rebuilds each chunk's absorbed
    queries (two small matmuls) and its latent outputs (one forward kernel: ~15% of the backward's work), then
    calls the backend's backward kernel on them, adding the latent rows' gradients of all chunks in fp32.
    The per-head projections are batched GEMMs over heads on strided views, written in place: no layout copies."""

    @staticmethod
    def forward(ctx, kernels, q_nope, q_rope, kv, idx, w_uk, w_uv, scale, lse, chunk, probs):
        B, L, H, _ = q_nope.shape
        A = kv.shape[-1] - q_rope.shape[-1]
        kv, idx = kv.contiguous(), idx.contiguous()
        out_V = q_nope.new_empty(B, L, H, w_uv.shape[1])
        given = lse is not None
        p = torch.empty(B, L, idx.shape[-1], dtype=torch.float32, device=q_nope.device) if given or probs else None
        lse_out = torch.empty(B, L, H, dtype=torch.float32, device=q_nope.device) if lse is None else lse.clone()
        w_uv_HAV = w_uv.transpose(1, 2)
        for c0 in range(0, L, chunk):
            rows = slice(c0, c0 + chunk)
            q = _absorbed_query_into(q_nope[:, rows], q_rope[:, rows], w_uk)
            idx_c = idx[:, rows].contiguous()
            if not given:
                o, lse_c = kernels.sparse_mla_forward(q, kv, idx_c, scale, A)
                if probs:
                    p[:, rows] = kernels.sparse_mla_probs(q, kv, idx_c, lse_c, scale, A)
                lse_out[:, rows] = lse_c
            else:
                o, p[:, rows] = kernels.sparse_mla_forward_given_lse(q, kv, idx_c, lse_out[:, rows].contiguous(),
                                                                     scale, A)
            for b in range(B):
                torch.bmm(_by_head(o[b]), w_uv_HAV, out=_by_head(out_V[b, rows]))
        ctx.save_for_backward(q_nope, q_rope, kv, idx, w_uk, w_uv, lse_out)
        ctx.kernels, ctx.scale, ctx.chunk = kernels, scale, chunk
        p = no_probs(idx) if p is None else p
        ctx.mark_non_differentiable(p, lse_out)
        return out_V, p, lse_out

    @staticmethod
    def backward(ctx, d_out_V, _grad_p, _grad_lse):
        q_nope, q_rope, kv, idx, w_uk, w_uv, lse = ctx.saved_tensors
        B, L = q_nope.shape[:2]
        A = kv.shape[-1] - q_rope.shape[-1]
        dq_nope, dq_rope = q_nope.new_empty(q_nope.shape), q_rope.new_empty(q_rope.shape)
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        dw_uk = torch.zeros(w_uk.shape, dtype=torch.float32, device=w_uk.device)
        dw_uv = torch.zeros(w_uv.shape, dtype=torch.float32, device=w_uv.device)
        w_uk_HAN = w_uk.transpose(1, 2)
        for c0 in range(0, L, ctx.chunk):
            rows = slice(c0, c0 + ctx.chunk)
            q = _absorbed_query_into(q_nope[:, rows], q_rope[:, rows], w_uk)
            idx_c, lse_c = idx[:, rows].contiguous(), lse[:, rows].contiguous()
            out_A, _ = ctx.kernels.sparse_mla_forward(q, kv, idx_c, ctx.scale, A)
            d_out = d_out_V[:, rows]
            d_out_A = q.new_empty(q.shape[:-1] + (A,))
            for b in range(B):
                torch.bmm(_by_head(d_out[b]), w_uv, out=_by_head(d_out_A[b]))
            dq, _ = ctx.kernels.sparse_mla_backward(q, kv, idx_c, out_A, lse_c, d_out_A, ctx.scale, A, dkv_acc=dkv)
            dq_rope[:, rows] = dq[..., A:]
            for b in range(B):
                dq_A = _by_head(dq[b, ..., :A])
                torch.bmm(dq_A, w_uk_HAN, out=_by_head(dq_nope[b, rows]))
                dw_uk += _bmm_fp32(_by_head(q_nope[b, rows]).transpose(1, 2), dq_A)
                dw_uv += _bmm_fp32(_by_head(d_out[b]).transpose(1, 2), _by_head(out_A[b]))
        return (None, dq_nope, dq_rope, dkv.to(kv.dtype), None, dw_uk.to(w_uk.dtype), dw_uv.to(w_uv.dtype), None,
                None, None, None)
