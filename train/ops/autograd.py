"""The autograd wrapper every sparse MLA backend shares: which kernels run in forward, recomputation and backward."""

from __future__ import annotations

import torch


def sparse_mla_function(kernels):
    """A torch.autograd.Function over a backend module's four kernels (the contract of `reference.sparse_mla`):
    `sparse_mla_forward` gives (out, lse), then `sparse_mla_probs` gives p from lse; given an earlier lse (the
    checkpoint recomputation) `sparse_mla_forward_given_lse` gives (out, p) in one pass; `sparse_mla_backward`
    gives (dq, dkv) from the saved out and lse. Looked up at each call (tests may wrap them)."""

    class SparseMLA(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, kv, idx, scale, v_dim, lse):
            q, kv, idx = q.contiguous(), kv.contiguous(), idx.contiguous()
            if lse is None:
                out, lse = kernels.sparse_mla_forward(q, kv, idx, scale, v_dim)
                p = kernels.sparse_mla_probs(q, kv, idx, lse, scale, v_dim)
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
            return dq, dkv, None, None, None, None

    return SparseMLA
