"""The one dispatch point for DSA's hot paths: model code calls these names, never a backend directly.

Each op has a chunked PyTorch reference (`reference.py`, any device: the oracle) and, where written, a
Triton kernel with the same contract (`triton_*.py`). Sparse attention comes in two forms: MLA's absorbed form
(`sparse_mla`: one latent row per key serves every head) and grouped-query attention (`sparse_gqa`: keys and
values per key head; MHA is the case of one query head per key head). Sparse MLA also has TileLang kernels for
Hopper GPUs (`tilelang_sparse_mla.py`; forward and backward in `_fwd` / `_bwd`, shared parts in `_common`) and
can take its backward from NVIDIA's cuDNN frontend (`cudnn_sparse_mla.py`; the indexer's top-k its selection:
`cudnn_topk.py`), both used where installed: `pip install .[gpu]`; its forward can come from FlashMLA
(`flashmla_sparse_mla.py`, installed apart: `pip install --no-deps sgl-flash-mla==1.0.0`). `DSA_KERNELS` picks:
  auto (default)  for CUDA tensors whose shapes a kernel supports: TileLang's sparse MLA on a Hopper GPU with
                  bf16 inputs and at least 64 heads, Triton for the rest, with cuDNN's sparse MLA backward
                  and FlashMLA's forward where they run (Hopper, bf16, d_qk 576 = latent 512 + rope 64;
                  FlashMLA: 64 or 128 heads), and cuDNN's radix selection in the indexer's top-k (Hopper);
                  else the reference
  reference       always the reference
  triton          Triton wherever the shapes allow, CPU tensors included (tests: TRITON_INTERPRET=1)
  tilelang        TileLang's sparse MLA, forward and backward (CUDA, bf16), Triton for the other ops
  cudnn           TileLang or Triton with cuDNN's backward and top-k selection (no FlashMLA), an error where
                  cuDNN's backward cannot run
The indexer's top-k runs in FP8 (DeepSeek's e4m3 form) or in the weights' dtype: `model.index_dtype` (`index_fp8`).
Shapes the kernels take: power-of-two head dims >= 16 (the main attention's d_qk may be two such parts,
192 = 128 + 64), since their tiles need them; anything else runs the reference. Head counts are free (tiles
pad them and mask or drop the rest). Top-k, the warm-up KL and dense attention take queries that sit past the
start of their keys (`q_offset`: a rank's piece of a context-parallel sequence).
"""

from __future__ import annotations

import functools
import os

import torch

from train.ops import common, cudnn_sparse_mla, cudnn_topk, flashmla_sparse_mla, reference
from train.ops.autograd import AbsorbedSparseMLA, ComposedSparseMLA, DeferredSparseIndexerKL, absorbed_query, no_probs
from train.ops.reference import dense_attention, indexer_logits

try:
    from train.ops import (
        triton_dense_indexer_kl,
        triton_sparse_gqa,
        triton_sparse_indexer_kl,
        triton_sparse_mla,
        triton_topk,
    )
except ImportError:  # no triton: the reference serves every op
    triton_dense_indexer_kl = triton_sparse_gqa = triton_sparse_indexer_kl = triton_sparse_mla = triton_topk = None

BACKENDS = ("auto", "reference", "triton", "tilelang", "cudnn")
_TILELANG: list = []  # the TileLang module once imported (None: not installed), imported on first use


def backend() -> str:
    name = os.environ.get("DSA_KERNELS", "auto")
    if name not in BACKENDS:
        raise ValueError(f"DSA_KERNELS={name!r}; allowed: {', '.join(BACKENDS)}")
    if name in ("triton", "tilelang", "cudnn") and triton_topk is None:
        raise ValueError(f"DSA_KERNELS={name}, but triton is not installed; pip install triton")
    if name == "tilelang" and _tilelang() is None:
        raise ValueError("DSA_KERNELS=tilelang, but tilelang is not installed; pip install .[gpu] (Hopper GPUs)")
    if name == "cudnn" and not _cudnn_importable():
        raise ValueError("DSA_KERNELS=cudnn, but NVIDIA's cuDNN frontend does not import here; pip install .[gpu] "
                         "(Hopper GPUs)")
    return name


_cudnn_importable = functools.cache(cudnn_sparse_mla.importable)  # tried once, on first use
_flashmla_importable = functools.cache(flashmla_sparse_mla.importable)
_cudnn_topk_importable = functools.cache(cudnn_topk.importable)
_composed = functools.cache(ComposedSparseMLA)  # one per combination of kernel modules


def _tilelang():
    if not _TILELANG:
        try:
            from train.ops import tilelang_sparse_mla
        except ImportError:
            tilelang_sparse_mla = None
        _TILELANG.append(tilelang_sparse_mla)
    return _TILELANG[0]


def _use_tilelang(q: torch.Tensor, kv: torch.Tensor, supported: bool) -> bool:
    """TileLang's sparse MLA: bf16 CUDA tensors on a Hopper GPU (DSA_KERNELS auto or tilelang)."""
    name = backend()
    if name not in ("auto", "tilelang", "cudnn") or not supported or not q.is_cuda:
        return False
    fits = q.dtype == kv.dtype == torch.bfloat16 and common.is_hopper(q.device)
    if name != "tilelang" and q.shape[2] < 64:
        return False  # below 64 heads a program cannot fill a warpgroup's wgmma rows: Triton was faster there
    if name == "tilelang" and not fits:
        raise ValueError(f"DSA_KERNELS=tilelang with {q.dtype} tensors on {torch.cuda.get_device_name(q.device)}: "
                         "the TileLang kernels take bf16 on Hopper GPUs; allowed: DSA_KERNELS=auto or triton")
    return fits and _tilelang() is not None


def _pow2(*dims: int) -> bool:
    return all(d >= 16 and d & (d - 1) == 0 for d in dims)


def _pow2_parts(d: int) -> bool:
    """d is a power of two >= 16, or two of them (the larger first): d_qk = nope + rope."""
    d1 = 1 << (d.bit_length() - 1)
    return _pow2(d1) and (d == d1 or _pow2(d - d1))


def _use_triton(x: torch.Tensor, supported: bool) -> bool:
    name = backend()
    if name == "reference" or triton_topk is None or not supported:
        return False
    if name == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"DSA_KERNELS=triton with tensors on {x.device}: Triton kernels need a CUDA device, "
                         "or TRITON_INTERPRET=1 (the interpreter, for tests); allowed: DSA_KERNELS=auto or reference")
    return name == "triton" or x.is_cuda


INDEX_DTYPES = ("auto", "fp8", "bf16")


def check_index_dtype(index_dtype: str) -> None:
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"model.index_dtype={index_dtype!r}; allowed: {', '.join(INDEX_DTYPES)}")


def index_fp8(index_dtype: str, x: torch.Tensor) -> bool:
    """Whether the indexer's top-k runs in FP8 for tensors like x: `model.index_dtype` fp8, or auto on a Hopper GPU."""
    check_index_dtype(index_dtype)
    return index_dtype == "fp8" or (index_dtype == "auto" and common.is_hopper(x.device))


def _fp8_tiles(q_BLGD: torch.Tensor) -> bool:
    """Triton's e4m3 tiles: indexer head dims of 32 at least, on GPUs of compute capability 8.9 and up (Ada,
    Hopper) or in the interpreter."""
    return q_BLGD.shape[-1] >= 32 and (not q_BLGD.is_cuda or torch.cuda.get_device_capability(q_BLGD.device) >= (8, 9))


def indexer_topk(q_BLGD: torch.Tensor, k_BSD: torch.Tensor, w_BLG: torch.Tensor, topk: int,
                 q_offset: int = 0, index_dtype: str = "bf16") -> torch.Tensor:
    """Top-k key positions per query (see `reference.indexer_topk`); queries at q_offset + t among the keys. The
    logits are bf16's, or DeepSeek's FP8 indexer's (`reference.indexer_topk_fp8`) where `index_fp8` says so."""
    D = q_BLGD.shape[-1]
    if index_fp8(index_dtype, q_BLGD):
        if _use_triton(q_BLGD, _pow2(D) and _fp8_tiles(q_BLGD)):
            return triton_topk.indexer_topk(q_BLGD, k_BSD, w_BLG, topk, q_offset=q_offset, fp8=True,
                                            select=_topk_select(q_BLGD))
        return reference.indexer_topk_fp8(q_BLGD, k_BSD, w_BLG, topk, q_offset=q_offset)
    if _use_triton(q_BLGD, _pow2(D)):
        return triton_topk.indexer_topk(q_BLGD, k_BSD, w_BLG, topk, q_offset=q_offset, select=_topk_select(q_BLGD))
    return reference.indexer_topk(q_BLGD, k_BSD, w_BLG, topk, q_offset=q_offset)


def _topk_select(q: torch.Tensor):
    """cuDNN's radix selection for Triton's top-k where it runs (DSA_KERNELS auto or cudnn), else None (Triton's)."""
    if backend() in ("auto", "cudnn") and cudnn_topk.fits(q) and _cudnn_topk_importable():
        return cudnn_topk.select
    return None


def sparse_mla(q_BLHD: torch.Tensor, kv_BLD: torch.Tensor, idx_BLK: torch.Tensor, scale: float, v_dim: int,
               lse_BLH: torch.Tensor | None = None, probs: bool = True):
    """Sparse MLA in absorbed form (see `reference.sparse_mla`): (out, p, lse). With probs=False and no lse_BLH
    the probabilities are not computed: p is `no_probs` (zeros, no memory)."""
    kernels = _sparse_mla_kernels(q_BLHD, kv_BLD, v_dim)
    if kernels is not None:
        return kernels.sparse_mla(q_BLHD, kv_BLD, idx_BLK, scale, v_dim, lse_BLH, probs)
    return _probs_or_none(reference.sparse_mla(q_BLHD, kv_BLD, idx_BLK, scale, v_dim, lse_BLH), lse_BLH, probs)


def _probs_or_none(out_p_lse: tuple, lse_BLH: torch.Tensor | None, probs: bool) -> tuple:
    """The twins compute p with the output; where the kernels would skip it, it is dropped the same way."""
    out, p, lse = out_p_lse
    return (out, p, lse) if probs or lse_BLH is not None else (out, no_probs(p), lse)


def _sparse_mla_kernels(q: torch.Tensor, kv_BLD: torch.Tensor, v_dim: int):
    """The sparse MLA kernels for these tensors (TileLang's or Triton's, with FlashMLA's forward and cuDNN's
    backward where they run), or None for the twin; the latent rows [v_dim | rope] set the dims the kernels must
    take."""
    rope = kv_BLD.shape[-1] - v_dim
    # TileLang's tiles: power-of-two parts of at least 32 (four warps' columns)
    if _use_tilelang(q, kv_BLD, v_dim >= 32 and rope >= 32 and _pow2(v_dim, rope)):
        kernels = _tilelang()
    elif _use_triton(q, _pow2(v_dim, rope) and q.dtype == kv_BLD.dtype):
        kernels = triton_sparse_mla
    else:
        kernels = None
    forward = flashmla_sparse_mla if kernels is not None and _use_flashmla(q, kv_BLD, v_dim) else None
    backward = cudnn_sparse_mla if _use_cudnn(q, kv_BLD, v_dim, kernels is not None) else None
    return _composed(kernels, forward, backward) if forward or backward else kernels


def _use_flashmla(q: torch.Tensor, kv: torch.Tensor, v_dim: int) -> bool:
    """FlashMLA's sparse MLA forward: DSA_KERNELS auto, tensors it takes, and the package installed."""
    return backend() == "auto" and flashmla_sparse_mla.fits(q, kv, v_dim) and _flashmla_importable()


def _use_cudnn(q: torch.Tensor, kv: torch.Tensor, v_dim: int, forward_kernels: bool) -> bool:
    """cuDNN's sparse MLA backward: DSA_KERNELS auto or cudnn, a kernel for the forward, and tensors it takes."""
    name = backend()
    if name not in ("auto", "cudnn"):
        return False
    fits = forward_kernels and cudnn_sparse_mla.fits(q, kv, v_dim)
    if name == "cudnn" and not fits:
        where = torch.cuda.get_device_name(q.device) if q.is_cuda else str(q.device)
        raise ValueError(f"DSA_KERNELS=cudnn with {q.dtype} tensors, latent rows of {kv.shape[-1]}, d_v {v_dim} on "
                         f"{where}: cuDNN's sparse MLA backward takes bf16 on Hopper GPUs with latent rows of 576 "
                         "(d_qk) and d_v 512; "
                         "allowed: DSA_KERNELS=auto, tilelang or triton")
    return fits and _cudnn_importable()


def sparse_mla_kernels_name(q: torch.Tensor, kv_BLD: torch.Tensor, v_dim: int) -> str:
    """Which kernels sparse MLA runs for tensors like these (for the plan's log line): "tilelang", "triton",
    either with ", flashmla forward" and ", cudnn backward", or "reference"."""
    kernels = _sparse_mla_kernels(q, kv_BLD, v_dim)
    if kernels is None:
        return "reference"
    if not isinstance(kernels, ComposedSparseMLA):
        return _kernels_name(kernels)
    parts = [f"{_kernels_name(m)} {what}" for m, what in ((kernels.forward_from, "forward"),
                                                          (kernels.backward_from, "backward")) if m is not None]
    return ", ".join([_kernels_name(kernels.base), *parts])


def _kernels_name(module) -> str:
    return module.__name__.rsplit(".", 1)[-1].split("_")[0]  # train.ops.tilelang_sparse_mla -> tilelang


# Absorbed queries a chunk of `absorbed_sparse_mla` may hold (elements; 2**29: 1 GiB in bf16).
ABSORBED_CHUNK_ELEMS = 1 << 29


def absorbed_sparse_mla(q_nope_BLHN: torch.Tensor, q_rope_BLHR: torch.Tensor, kv_BLD: torch.Tensor,
                        idx_BLK: torch.Tensor, w_uk_HNA: torch.Tensor, w_uv_HVA: torch.Tensor, scale: float,
                        lse_BLH: torch.Tensor | None = None, chunk: int | None = None, probs: bool = True):
    """MLA's sparse attention in absorbed form from its own parts: (out [B, L, H, V], p, lse), where the
    attention is `sparse_mla` of [q_nope · W_UK | q_rope] over the latent rows kv = [latent | rope key], and
    out = its latent output · W_UV per head (probs=False: as in `sparse_mla`). With a kernel, queries run in
    chunks of `chunk` tokens (default: ABSORBED_CHUNK_ELEMS absorbed elements), which bounds the layer's working
    set; the twin is the plain composition."""
    A, H, D = kv_BLD.shape[-1] - q_rope_BLHR.shape[-1], q_nope_BLHN.shape[2], kv_BLD.shape[-1]
    kernels = _sparse_mla_kernels(q_nope_BLHN, kv_BLD, A)
    if kernels is None:
        q_BLHD = absorbed_query(q_nope_BLHN, q_rope_BLHR, w_uk_HNA)
        out_BLHA, p_BLK, lse = _probs_or_none(reference.sparse_mla(q_BLHD, kv_BLD, idx_BLK, scale, A, lse_BLH),
                                              lse_BLH, probs)
        return torch.einsum("blha,hva->blhv", out_BLHA, w_uv_HVA), p_BLK, lse
    chunk = chunk or max(1, ABSORBED_CHUNK_ELEMS // (H * D))
    return AbsorbedSparseMLA.apply(kernels, q_nope_BLHN, q_rope_BLHR, kv_BLD, idx_BLK, w_uk_HNA, w_uv_HVA, scale,
                                   lse_BLH, chunk, probs)


def sparse_gqa(q_BLHD: torch.Tensor, k_BSJD: torch.Tensor, v_BSJV: torch.Tensor, idx_BLK: torch.Tensor,
               scale: float, lse_BLH: torch.Tensor | None = None, probs: bool = True):
    """Sparse grouped-query attention, one selection per query for all heads (see `reference.sparse_gqa`):
    (out, p, lse); probs=False as in `sparse_mla`."""
    kernels = _sparse_gqa_kernels(q_BLHD, k_BSJD, v_BSJV)
    if kernels is not None:
        return kernels.sparse_gqa(q_BLHD, k_BSJD, v_BSJV, idx_BLK, scale, lse_BLH, probs)
    return _probs_or_none(reference.sparse_gqa(q_BLHD, k_BSJD, v_BSJV, idx_BLK, scale, lse_BLH), lse_BLH, probs)


def _sparse_gqa_kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Triton's sparse GQA for tensors it takes (power-of-two head dims >= 16, one dtype), else None (the twin)."""
    fits = _pow2(q.shape[-1], v.shape[-1]) and q.dtype == k.dtype == v.dtype
    return triton_sparse_gqa if _use_triton(q, fits) else None


def sparse_gqa_kernels_name(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """Which kernels sparse GQA runs for tensors like these (the plan's log line): "triton" or "reference"."""
    return "triton" if _sparse_gqa_kernels(q, k, v) is not None else "reference"


def dense_indexer_kl(qi_BLGD: torch.Tensor, ki_BSD: torch.Tensor, wi_BLG: torch.Tensor, qa_BLHD: torch.Tensor,
                     ka_BSHD: torch.Tensor, scale: float, topk: int, q_offset: int = 0, index_dtype: str = "bf16"):
    """Warm-up indexer KL over the full causal span, and recall (see `reference.dense_indexer_kl`); queries at
    q_offset + t among the keys. The recall's top-k is the one the sparse stage would take (`index_fp8`)."""
    D = qi_BLGD.shape[-1]
    fp8 = index_fp8(index_dtype, qi_BLGD)
    if _use_triton(qi_BLGD, _pow2(D) and _pow2_parts(qa_BLHD.shape[-1]) and (not fp8 or _fp8_tiles(qi_BLGD))):
        return triton_dense_indexer_kl.dense_indexer_kl(qi_BLGD, ki_BSD, wi_BLG, qa_BLHD, ka_BSHD, scale, topk,
                                                        q_offset=q_offset, fp8=fp8)
    return reference.dense_indexer_kl(qi_BLGD, ki_BSD, wi_BLG, qa_BLHD, ka_BSHD, scale, topk, q_offset=q_offset,
                                      fp8=fp8)


def sparse_indexer_kl(qi_BLGD: torch.Tensor, ki_BLD: torch.Tensor, wi_BLG: torch.Tensor, idx_BLK: torch.Tensor,
                      p_BLK: torch.Tensor, deferred: bool = False) -> torch.Tensor:
    """Sparse-stage indexer KL over the selected set (see `reference.sparse_indexer_kl`). deferred: in a
    checkpointed layer, computed in backward from the recomputation's tensors (`DeferredSparseIndexerKL`; p may be
    `no_probs`): the returned KL holds zeros until the backward has run, then the KL."""
    if _use_triton(qi_BLGD, _pow2(qi_BLGD.shape[-1])):
        kl_fn = triton_sparse_indexer_kl.sparse_indexer_kl
    else:
        kl_fn = reference.sparse_indexer_kl
    if deferred:
        value_BL = torch.zeros(qi_BLGD.shape[:2], dtype=torch.float32, device=qi_BLGD.device)
        return DeferredSparseIndexerKL.apply(kl_fn, qi_BLGD, ki_BLD, wi_BLG, idx_BLK, p_BLK.detach(), value_BL)
    return kl_fn(qi_BLGD, ki_BLD, wi_BLG, idx_BLK, p_BLK)


__all__ = [
    "absorbed_sparse_mla",
    "backend",
    "dense_attention",
    "dense_indexer_kl",
    "INDEX_DTYPES",
    "check_index_dtype",
    "index_fp8",
    "indexer_logits",
    "indexer_topk",
    "sparse_indexer_kl",
    "sparse_gqa",
    "sparse_gqa_kernels_name",
    "sparse_mla",
    "sparse_mla_kernels_name",
]
