"""Whole training steps of a DeepSeek-V3-architecture or a Qwen3 (GQA) model (bf16 weights, AdamW, activation
checkpointing): time, tokens/s and peak memory of a dense step (all parameters), a warm-up step (indexer only, KL
over the full span) and a sparse step (top-k attention, LM loss + the sparse indexer KL), through the training
code's own `compute_loss`."""

from __future__ import annotations

import torch

from bench.common import DI, TOPK, G, guarded, mark, matmul_tflops

ONE_B = dict(vocab_size=32768, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
             num_hidden_layers=18, first_k_dense_replace=18, n_routed_experts=8, n_shared_experts=1,
             num_experts_per_tok=2, n_group=1, topk_group=1, num_attention_heads=16, num_key_value_heads=16,
             q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
             max_position_embeddings=163840, tie_word_embeddings=False)

# DeepSeek-V3's attention shape (hidden 7168, 128 heads, q_lora 1536, kv_lora 512, rope 64, nope 128, v 128) in
# two layers with dense MLPs (18432), vocab 32,768: the per-layer cost users convert, at a size one GPU holds.
V3_ATTENTION = dict(vocab_size=32768, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                    num_hidden_layers=2, first_k_dense_replace=2, n_routed_experts=8, n_shared_experts=1,
                    num_experts_per_tok=2, n_group=1, topk_group=1, num_attention_heads=128,
                    num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840, tie_word_embeddings=False)
# Qwen3-32B's attention shape (hidden 5120, 64 query heads over 8 key heads of 128, q/k norms) in two layers with
# its MLP (25600), vocab 32,768: what a GQA conversion costs per layer. Its indexer is sized as a conversion sizes
# it (32 x 128), not by --e2e-index-heads / --e2e-index-dim, which are DeepSeek's.
QWEN3_ATTENTION = dict(model_type="qwen3", vocab_size=32768, hidden_size=5120, intermediate_size=25600,
                       num_hidden_layers=2, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=163840, tie_word_embeddings=False)
MODELS = {"1b": ONE_B, "v3-attention": V3_ATTENTION, "qwen3-attention": QWEN3_ATTENTION}

STEPS = (("dense step", "base"), ("warm-up step", "warmup"), ("sparse step", "sparse"))


def bench_e2e(lengths: list[int], iters: int, warmup_max: int, stages: list[str], cold_from: int,
              recompute_topk: bool = False, index_heads: int = G, index_dim: int = DI, arch: dict = ONE_B,
              index_dtype: str = "auto", breakdown: bool = False) -> list[dict]:
    """`index_dtype`: the indexer top-k's (`model.index_dtype`); `breakdown`: one more run of each step under the
    profiler, its time split by part, and the step's bound (`bench/breakdown.py`)."""
    from train import ops
    from train.model import ModelConfig, build_model
    from train.stages import STAGES, StageConfig, compute_loss, param_groups

    gqa = arch.get("model_type", "deepseek_v3") != "deepseek_v3"
    model = build_model(ModelConfig(arch=arch, index_n_heads=None if gqa else index_heads,
                                    index_head_dim=None if gqa else index_dim, index_topk=TOPK,
                                    dtype="bfloat16", index_dtype=index_dtype)).cuda()
    fp8 = ops.index_fp8(index_dtype, next(model.parameters()))
    rates = None
    if breakdown:
        from bench import breakdown as bd

        rates = (matmul_tflops(5), bd.fp8_matmul_tflops())
        print(f"[e2e] matmul 8192^3: bf16 {rates[0]:.0f} TFLOP/s, fp8 {rates[1] or 0:.0f} TFLOP/s", flush=True)
    model.activation_checkpointing = True
    model.keep_topk_for_recompute = not recompute_topk
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[e2e] {n_params / 1e9:.3f}B parameters ({sum(p.numel() for p in model.indexer_parameters()) / 1e6:.0f}M"
          f" indexer, top-k in {'fp8' if fp8 else 'bf16'})", flush=True)
    rows = []
    for L in lengths:
        ids = torch.randint(0, arch["vocab_size"], (1, L), device="cuda")
        for name, stage_name in STEPS:
            if stage_name not in stages or (stage_name == "warmup" and L > warmup_max):
                continue
            stage = STAGES[stage_name]
            stage_cfg = StageConfig(name=stage_name, lr=1e-5)
            groups = param_groups(model, stage, stage_cfg)
            opt = torch.optim.AdamW([{"params": g["params"], "lr": g["lr"]} for g in groups])

            def step():
                loss, _ = compute_loss(model, stage, stage_cfg, ids, ids)
                mark(f"{name} L={L} after forward")
                loss.backward()
                mark(f"{name} L={L} after backward")
                opt.step()
                opt.zero_grad(set_to_none=True)
            cold = L >= cold_from  # long steps: one timed run, no warm-up run
            r = guarded(f"e2e {name} L={L}", step, 1 if cold else iters, warm=not cold)
            if "ms" in r:
                r["tokens_per_sec"] = L / (r["ms"] * 1e-3)
                if breakdown:
                    r["breakdown"] = bd.profile_step(step)
                    r["bound"] = bd.bound(r["breakdown"], bd.step_flops(model, L, stage_name, fp8), *rates)
                    parts = {k: round(v, 1) for k, v in r["breakdown"].items() if isinstance(v, float)}
                    print(f"  breakdown: {parts}; bound {r['bound']['step']:,.0f} ms", flush=True)
                    for what, ms in r["breakdown"]["everything else, top"].items():
                        print(f"    everything else: {ms:8.1f} ms  {what}", flush=True)
            rows.append({"L": L, "index_dtype": "fp8" if fp8 else "bf16", **r})
            opt.state.clear()
            torch.cuda.empty_cache()
    rows.append({"name": "parameters", "total": n_params})
    return rows
