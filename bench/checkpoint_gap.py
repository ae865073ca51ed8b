"""`python -m bench.checkpoint_gap`: where a sparse-stage step under activation checkpointing differs from the same
step without it, parameter by parameter, for each sparse MLA backend and model initialisation (GPU).

A tiny model with DeepSeek's latent rows (64 heads, latent 512 + rope 64, indexer 16 x 64, top-8 of 40 tokens),
bf16, one batch, one row per (seed, backend): the parameter whose checkpointed gradient differs most from the
plain one relative to its own largest entry, that difference relative to the model's largest gradient, and the
parameter's own largest entry. With `--detail`, every parameter of the first seed's runs, and the two probability
paths' outputs on the same inputs (the plain run's probabilities kernel, the recomputation's forward given the
log-sum-exp)."""

from __future__ import annotations

import argparse
import os

import torch

from train import metrics

ARCH = dict(model_type="deepseek_v3", vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=2, num_attention_heads=64, num_key_value_heads=64, n_shared_experts=1,
            n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, kv_lora_rank=512, q_lora_rank=48,
            qk_rope_head_dim=64, v_head_dim=16, qk_nope_head_dim=16, first_k_dense_replace=1,
            max_position_embeddings=1024)


def gaps(backend: str, seed: int, device: str = "cuda") -> tuple[dict, dict, list[tuple]]:
    """One model (initialised from `seed`), its sparse-stage gradients plain, plain again and checkpointed under
    `backend`: (plain metrics, checkpointed metrics, one row per parameter, worst first: (checkpointed against
    plain / its own largest entry, the same / the model's largest gradient entry, plain again against plain / its
    own largest entry, its own largest entry / the model's, name)). The second plain run measures what the kernels'
    own run-to-run variation (fp32 atomics added in another order) gives."""
    from train.model import ModelConfig, build_model
    from train.stages import STAGES, StageConfig, compute_loss, param_groups, settle_metrics

    os.environ["DSA_KERNELS"] = backend
    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch=ARCH, index_n_heads=16, index_head_dim=64, index_topk=8,
                                    index_dtype="bf16")).to(device)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.1 * torch.randn(q.shape, generator=g).to(device) * (q.abs().mean() + 1e-3))
    model.to(torch.bfloat16)
    stage, cfg = STAGES["sparse"], StageConfig(name="sparse")
    names = {id(r): n for n, r in model.named_parameters()}
    params = [q for grp in param_groups(model, stage, cfg) for q in grp["params"]]
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(seed)).to(device)

    def run(checkpointed: bool):
        model.activation_checkpointing = checkpointed
        loss, metrics = compute_loss(model, stage, cfg, ids, torch.roll(ids, -1, 1))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        metrics = settle_metrics(model, stage, cfg, metrics)
        return ({k: v.float().item() for k, v in metrics.items() if "per_layer" not in k},
                [torch.zeros_like(q, dtype=torch.float32) if d is None else d.float() for q, d in zip(params, grads)])

    (m_plain, g_plain), (_, g_again), (m_ckpt, g_ckpt) = run(False), run(False), run(True)
    overall = max(d.abs().max().item() for d in g_plain)
    rows = []
    for q, a, b, c in zip(params, g_ckpt, g_plain, g_again):
        diff, again, own = (a - b).abs().max().item(), (c - b).abs().max().item(), max(b.abs().max().item(), 1e-30)
        rows.append((diff / own, diff / overall, again / own, own / overall, names[id(q)]))
    return m_plain, m_ckpt, sorted(rows, reverse=True)


def probability_paths(backend: str) -> str:
    """The two probability paths of `backend`'s kernels on the same random inputs."""
    from train import ops

    os.environ["DSA_KERNELS"] = backend
    kernels = ops._sparse_mla_kernels(torch.zeros(1, 1, 64, 16, device="cuda", dtype=torch.bfloat16),
                                      torch.zeros(1, 1, 576, device="cuda", dtype=torch.bfloat16), 512)
    kernels = getattr(kernels, "base", kernels)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 40, 64, 576, generator=g).cuda().bfloat16()
    kv = torch.randn(1, 40, 576, generator=g).cuda().bfloat16()
    idx = torch.stack([torch.randperm(40, generator=g)[:8] for _ in range(40)])[None].cuda()
    idx = idx.masked_fill(idx > torch.arange(40, device="cuda")[None, :, None], -1)
    _, lse = kernels.sparse_mla_forward(q, kv, idx, 576 ** -0.5, 512)
    p_plain = kernels.sparse_mla_probs(q, kv, idx, lse, 576 ** -0.5, 512)
    _, p_given = kernels.sparse_mla_forward_given_lse(q, kv, idx, lse, 576 ** -0.5, 512)
    return (f"{backend}: probabilities kernel against the forward given the log-sum-exp, max |diff| "
            f"{(p_plain - p_given).abs().max():.3e} (max p {p_plain.max():.3e})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.checkpoint_gap", description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=["tilelang", "triton"], help="DSA_KERNELS values compared")
    p.add_argument("--seeds", type=int, default=8, help="model initialisations (seeds 0..N-1)")
    p.add_argument("--detail", type=int, default=0, help="with N > 0: the N worst parameters of seed 0's runs")
    args = p.parse_args(argv)
    print("| seed | backend | LM loss plain / checkpointed | indexer KL plain / checkpointed | worst parameter | "
          "diff / own max | diff / model's max | plain again: diff / own max | own max / model's max |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seed in range(args.seeds):
        for backend in args.backends:
            m_plain, m_ckpt, rows = gaps(backend, seed)
            lm, kl = metrics.LM_LOSS, metrics.INDEXER_KL
            for i, (rel, rel_all, again, own, name) in enumerate(rows[: max(1, args.detail if seed == 0 else 1)]):
                head = (f"{seed} | {backend} | {m_plain[lm]:.6f} / {m_ckpt[lm]:.6f} | {m_plain[kl]:.3e} / "
                        f"{m_ckpt[kl]:.3e}") if i == 0 else "  |   |   |  "
                print(f"| {head} | {name} | {rel:.3e} | {rel_all:.3e} | {again:.3e} | {own:.3e} |", flush=True)
    for backend in args.backends:
        print(probability_paths(backend))


if __name__ == "__main__":
    main()
