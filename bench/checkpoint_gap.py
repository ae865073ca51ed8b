"""`python -m bench.checkpoint_gap`: where a sparse-stage step under activation checkpointing differs from the same
step without it, parameter by parameter, with one sparse MLA backend (GPU).

A tiny model with DeepSeek's latent rows (64 heads, latent 512 + rope 64, indexer 16 x 64, top-8 of 40 tokens),
bf16, one batch: the stage loss's gradients plain and checkpointed, each parameter's largest difference relative
to its own largest entry and to the largest gradient of the whole model, and the two probability paths'
outputs on the same inputs (the plain run's probabilities kernel, the recomputation's forward given the
log-sum-exp)."""

from __future__ import annotations

import argparse
import os

import torch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.checkpoint_gap", description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="tilelang", help="DSA_KERNELS for both runs")
    p.add_argument("--top", type=int, default=8, help="parameters listed")
    args = p.parse_args(argv)
    os.environ["DSA_KERNELS"] = args.backend
    from train import ops
    from train.model import ModelConfig, build_model
    from train.stages import STAGES, StageConfig, compute_loss, param_groups

    arch = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=64, num_key_value_heads=64, n_shared_experts=1, n_routed_experts=4,
                num_experts_per_tok=2, n_group=2, topk_group=1, kv_lora_rank=512, q_lora_rank=48,
                qk_rope_head_dim=64, v_head_dim=16, qk_nope_head_dim=16, first_k_dense_replace=1,
                max_position_embeddings=1024)
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, index_n_heads=16, index_head_dim=64, index_topk=8)).cuda()
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.1 * torch.randn_like(q) * (q.abs().mean() + 1e-3))
    model.to(torch.bfloat16)
    stage, cfg = STAGES["sparse"], StageConfig(name="sparse")
    named = [(n, q) for g in param_groups(model, stage, cfg) for q in g["params"] for n, r in model.named_parameters()
             if r is q]
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0)).cuda()

    def run(checkpointed: bool):
        model.activation_checkpointing = checkpointed
        loss, metrics = compute_loss(model, stage, cfg, ids, torch.roll(ids, -1, 1))
        grads = torch.autograd.grad(loss, [q for _, q in named], allow_unused=True)
        return {k: v.float().item() for k, v in metrics.items() if "per_layer" not in k}, [
            torch.zeros_like(q) if g is None else g.float() for (_, q), g in zip(named, grads)]

    (m_plain, g_plain), (m_ckpt, g_ckpt) = run(False), run(True)
    print("metrics plain / checkpointed:", {k: (round(m_plain[k], 6), round(m_ckpt[k], 6)) for k in m_plain})
    overall = max(g.abs().max().item() for g in g_plain)
    rows = []
    for (name, _), a, b in zip(named, g_ckpt, g_plain):
        diff = (a - b).abs().max().item()
        rows.append((diff / max(b.abs().max().item(), 1e-12), diff / overall, b.abs().max().item(), name))
    print(f"largest gradient entry of the model: {overall:.3e}")
    print("| parameter | max diff / own max | max diff / model's max | own max |")
    for rel, rel_all, own, name in sorted(rows, reverse=True)[: args.top]:
        print(f"| {name} | {rel:.3e} | {rel_all:.3e} | {own:.3e} |")

    kernels = ops._sparse_mla_kernels(torch.zeros(1, 1, 64, 16, device="cuda", dtype=torch.bfloat16),
                                      torch.zeros(1, 1, 576, device="cuda", dtype=torch.bfloat16), 512)
    kernels = getattr(kernels, "forward", kernels)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 40, 64, 576, generator=g).cuda().bfloat16()
    kv = torch.randn(1, 40, 576, generator=g).cuda().bfloat16()
    idx = torch.stack([torch.randperm(40, generator=g)[:8] for _ in range(40)])[None].cuda()
    idx = idx.masked_fill(idx > torch.arange(40, device="cuda")[None, :, None], -1)
    _, lse = kernels.sparse_mla_forward(q, kv, idx, 576 ** -0.5, 512)
    p_plain = kernels.sparse_mla_probs(q, kv, idx, lse, 576 ** -0.5, 512)
    _, p_given = kernels.sparse_mla_forward_given_lse(q, kv, idx, lse, 576 ** -0.5, 512)
    print(f"probabilities: probs kernel against forward given lse, max |diff| {(p_plain - p_given).abs().max():.3e} "
          f"(max p {p_plain.max():.3e})")


if __name__ == "__main__":
    main()
