"""`make plan`: what a stage costs before it runs; no weights are allocated (shapes come from a meta model).

Parameters, tokens per step and per stage, steps, gradient accumulation, per-GPU memory of weights,
gradients and optimizer state under ZeRO 0-3, and training FLOPs per token of each stage.

FLOPs per token (multiply-adds x 2), for sequence length L, top-k K, per layer unless noted:
- matmuls: 2 x active parameters (MoE: shared + routed experts per token; the LM head; no embedding).
- dense causal attention: 2 H (d_qk + d_v) (L+1)/2 (MLA per-head form: d_qk = N + R; GQA: d_qk = d_v = D).
- sparse attention: MLA in absorbed MQA form 2 H (A + R + A) K (A = kv_lora_rank, R = rope dims), plus the
  absorption matmuls 2 H N A + 2 H A V; GQA 2 H (D + D) K.
- indexer: projections 2 (Q G D + C D + C G) (Q: MLA's query latent, else the hidden size C), scoring
  2 G D (L+1)/2 over the causal span.
Warm-up = backbone forward (dense) + indexer forward and backward (x3) + the recomputed attention target
2 H d_qk (L+1)/2. Sparse = 3 x backbone with sparse attention (forward + backward ~ 2x) + the indexer's
top-k scoring forward + its selected-set KL (3 x 2 G D K) and projections (x3). Base = 3 x dense backbone.

Activation memory per GPU (bytes; bf16 activations, activation checkpointing on, as long sequences need), for
M = micro_batch x L / CP tokens of the rank's queries and S = micro_batch x L gathered key tokens, n layers:
- checkpointed layer inputs: n M C 2;
- kept per layer until its backward, sparse stage: top-k indices n M K 4 (none with stage.recompute_topk) and the
  attention's log-sum-exp n M H 4;
- one layer's working set under recomputation, the largest of any layer:
  - queries and their gradients: 2 M H (N + R + V) 2 (GQA: 2 M H 2D 2);
  - keys: the gathered latent, rope key and indexer key with their gradients, 2 S (A + R + D) 2 (GQA: keys
    and values of J heads, 2 S (2 J D_h + D) 2); MLA's dense stages add per-head keys and the up-projection,
    S H (2N + R + V) 2 (twice in the base stage, whose keys get gradients); the sparse stage adds MLA's three
    absorbed-query chunks, 3 min(M H (A + R), 2**29) 2, and the selection's probabilities, M K 4;
  - the indexer's queries and their gradients, 2 M G D 2;
  - the MLP: 4 M I 2 with I the widest of the dense MLP and (shared + routed per token) x the expert width;
- the LM head's logits chunk (4096 tokens, fp32, and its gradient): 2 x 4096 x vocab x 4.
A configuration fits when weights, gradients, optimizer state and activations stay within 90% of the GPU's
memory (the rest: CUDA context, allocator, communication buffers).
"""

from __future__ import annotations

from train.engine import ZERO_STAGES, use_bf16


def count_parameters(config: dict, index_n_heads: int, index_head_dim: int) -> dict:
    from train.model.hf import index_query_dim, meta_model

    meta = meta_model(config)
    C, Q = config["hidden_size"], index_query_dim(config)
    G, D = index_n_heads, index_head_dim
    L = config["num_hidden_layers"]
    indexer = L * (G * D * Q + D * C + 2 * D + G * C)
    total = sum(p.numel() for p in meta.parameters())
    active = 0
    for layer in meta.model.layers:
        active += sum(p.numel() for p in layer.self_attn.parameters())
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            per_expert = sum(p.numel() for p in mlp.experts.parameters()) // config["n_routed_experts"]
            active += per_expert * config["num_experts_per_tok"]
            active += sum(p.numel() for p in mlp.shared_experts.parameters()) + mlp.gate.weight.numel()
        else:
            active += sum(p.numel() for p in mlp.parameters())
    active += meta.lm_head.weight.numel()
    return {"backbone": total, "indexer": indexer, "total": total + indexer, "active_matmul": active}


def attention_dims(config: dict) -> dict:
    """The widths the attention formulas read. MLA: H heads, per-head d_qk = N + R and d_v = V, latent A; sparse
    runs absorbed (keys d_qk' = A + R, values A, plus the absorption matmuls). GQA / MHA: H query heads over J key
    heads of width D; sparse runs as it is."""
    from train.model.hf import head_dim, is_mla

    H = config["num_attention_heads"]
    if is_mla(config):
        N, R, V, A = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"], config["kv_lora_rank"]
        return dict(H=H, qk=N + R, v=V, sparse_qk=A + R, sparse_v=A, absorb=N * A + A * V, kv_row=A + R,
                    dense_keys=H * (2 * N + R + V), q=N + R + V, absorbed_q=A + R)
    J, D = config.get("num_key_value_heads") or H, head_dim(config)
    return dict(H=H, qk=D, v=D, sparse_qk=D, sparse_v=D, absorb=0, kv_row=2 * J * D, dense_keys=0, q=2 * D,
                absorbed_q=0)


def flops_per_token(config: dict, params: dict, seq_len: int, topk: int, index_n_heads: int,
                    index_head_dim: int) -> dict:
    from train.model.hf import index_query_dim

    a = attention_dims(config)
    H, L = a["H"], config["num_hidden_layers"]
    Q, C = index_query_dim(config), config["hidden_size"]
    G, D = index_n_heads, index_head_dim
    half_span = (seq_len + 1) / 2
    K = min(topk, seq_len)
    matmul = 2 * params["active_matmul"]
    dense_attn = L * 2 * H * (a["qk"] + a["v"]) * half_span
    sparse_attn = L * (2 * H * (a["sparse_qk"] + a["sparse_v"]) * K + 2 * H * a["absorb"])
    idx_proj = L * 2 * (Q * G * D + C * D + C * G)
    idx_score = L * 2 * G * D * half_span
    target = L * 2 * H * a["qk"] * half_span
    return {
        "base": 3 * (matmul + dense_attn),
        "warmup": matmul + dense_attn + 3 * (idx_proj + idx_score) + target,
        "sparse": 3 * (matmul + sparse_attn) + idx_score + 3 * (idx_proj + L * 2 * G * D * K),
    }


def memory_per_gpu(total: int, trainable: int, world: int, zero: int, bf16: bool) -> dict:
    """Bytes per GPU: weights (bf16 or fp32), gradients, optimizer (fp32 master copy when bf16, Adam m and v)."""
    w_bytes = 2 if bf16 else 4
    opt_bytes = 12 if bf16 else 8
    return {
        "weights": w_bytes * total / (world if zero >= 3 else 1),
        "gradients": w_bytes * trainable / (world if zero >= 2 else 1),
        "optimizer": opt_bytes * trainable / (world if zero >= 1 else 1),
    }


def activation_bytes(config: dict, stage: str, seq_len: int, micro_batch: int, cp: int, topk: int,
                     index_head_dim: int, index_n_heads: int, keep_topk: bool = True) -> dict:
    """Activation memory per GPU by part (see the module docstring for the formulas)."""
    a = attention_dims(config)
    H, n = a["H"], config["num_hidden_layers"]
    C, E = config["hidden_size"], config["vocab_size"]
    G, D = index_n_heads, index_head_dim
    S = micro_batch * seq_len
    M = S // cp
    K = min(topk, seq_len)
    experts = config.get("n_shared_experts", 0) + config.get("num_experts_per_tok", 0)
    inter = config["intermediate_size"] if config.get("first_k_dense_replace", n) > 0 else 0
    if config.get("first_k_dense_replace", n) < n:
        inter = max(inter, experts * config["moe_intermediate_size"])
    keys = 2 * S * (a["kv_row"] + D) * 2
    if stage == "sparse":
        keys += 3 * min(M * H * a["absorbed_q"], 2**29) * 2 + M * K * 4
    else:
        keys += S * a["dense_keys"] * 2 * (2 if stage == "base" else 1)
    parts = {
        "layer_inputs": n * M * C * 2,
        "kept_per_layer": n * M * (K * 4 * keep_topk + H * 4) if stage == "sparse" else 0,
        "layer_working_set": 2 * M * H * a["q"] * 2 + keys + 2 * M * G * D * 2 + 4 * M * inter * 2,
        "lm_head_chunk": 2 * 4096 * E * 4,
    }
    parts["total"] = sum(parts.values())
    return parts


GPU_HEADROOM = 0.9  # share of a GPU's memory a plan may fill


def trained(stage: str, params: dict) -> int:
    return {"base": params["backbone"], "warmup": params["indexer"], "sparse": params["total"]}[stage]


def smallest_fit(config: dict, cfg, stage: str, global_batch: int, params: dict, index: dict, gpu_bytes: float,
                 max_gpus: int = 4096) -> dict | None:
    """The fewest GPUs (powers of two) and, for that count, the smallest context-parallel degree with which
    `stage` fits in `gpu_bytes` under ZeRO-3 (weights, gradients, optimizer state sharded over all GPUs); the
    global batch must split over the data-parallel ranks. None when nothing up to `max_gpus` fits."""
    s, L = cfg.stage, cfg.data.seq_len
    bf16 = use_bf16(cfg.deepspeed, accelerator_present=True)
    gpus = 1
    while gpus <= max_gpus:
        cp = 1
        while cp <= gpus and (cp == 1 or L % (2 * cp) == 0):
            dp = gpus // cp
            if global_batch % (s.micro_batch * dp) == 0:
                states = sum(memory_per_gpu(params["total"], trained(stage, params), gpus, 3, bf16).values())
                act = activation_bytes(config, stage, L, s.micro_batch, cp, index["index_topk"],
                                       index["index_head_dim"], index["index_n_heads"], not s.recompute_topk)
                if states + act["total"] <= GPU_HEADROOM * gpu_bytes:
                    return {"gpus": gpus, "context_parallel": cp, "states": states, "activations": act["total"]}
            cp *= 2
        gpus *= 2
    return None


def make_plan(cfg, world: int) -> dict:
    from train.model.surgery import index_config

    from train.model.hf import source_config

    # a plan reads shapes only: the architecture when the config has one, else the checkpoint's config.json
    config = source_config(None if cfg.model.arch else cfg.model_path(), cfg.model.arch)
    index = index_config(config, cfg.model)
    G, D = index["index_n_heads"], index["index_head_dim"]
    params = count_parameters(config, G, D)
    stage = cfg.stage
    trainable = trained(stage.name, params)
    tokens_step = cfg.tokens_per_step()
    bf16 = use_bf16(cfg.deepspeed, accelerator_present=True)  # plans are for GPUs
    return {
        "stage": stage.name, "world_size": world, "preset": cfg.preset.get("name"), "lr": stage.lr,
        "seq_len": cfg.data.seq_len, "index": index,
        "parameters": params, "trainable_parameters": trainable,
        "tokens_per_step": tokens_step, "steps": stage.steps, "tokens_in_stage": tokens_step * stage.steps,
        "gradient_accumulation": cfg.grad_accum(world),
        "memory_per_gpu_bytes": {f"zero{z}": memory_per_gpu(params["total"], trainable, world, z, bf16)
                                 for z in ZERO_STAGES},
        "flops_per_token": flops_per_token(config, params, cfg.data.seq_len, index["index_topk"], G, D),
        "context_parallel": cfg.deepspeed.context_parallel,
        "activation_bytes_per_gpu": {
            name: activation_bytes(config, name, cfg.data.seq_len, stage.micro_batch, cfg.deepspeed.context_parallel,
                                   index["index_topk"], D, G, not stage.recompute_topk)
            for name in dict.fromkeys(("warmup", "sparse", stage.name))},
        "gpu_memory_gb": cfg.run.plan_gpu_memory_gb,
        # the conversion's two stages whichever is planned, each with its preset's global batch
        "smallest_fit": {name: smallest_fit(config, cfg, name, _global_batch(cfg, name), params, index,
                                            cfg.run.plan_gpu_memory_gb * 1e9)
                         for name in dict.fromkeys(("warmup", "sparse", stage.name))},
    }


def _global_batch(cfg, stage: str) -> int:
    sizes = cfg.preset.get("stages", {}).get(stage, {})
    return stage == cfg.stage.name and cfg.stage.global_batch or sizes.get("global_batch", cfg.stage.global_batch)


def format_plan(plan: dict) -> str:
    gib = 2**30
    p = plan["parameters"]
    lines = [
        f"[plan] stage {plan['stage']} on {plan['world_size']} GPU(s); preset {plan['preset']}, lr {plan['lr']:g}, "
        f"{plan['seq_len']:,}-token sequences, indexer {plan['index']['index_n_heads']} x "
        f"{plan['index']['index_head_dim']}, top-{plan['index']['index_topk']}",
        f"[plan] parameters: {p['total']:,} ({p['backbone']:,} backbone + {p['indexer']:,} indexer); "
        f"trained: {plan['trainable_parameters']:,}; active per token (matmuls): {p['active_matmul']:,}",
        f"[plan] tokens per step: {plan['tokens_per_step']:,}",
        f"[plan] tokens in stage: {plan['tokens_in_stage']:,} ({plan['steps']:,} steps)",
        f"[plan] gradient accumulation: {plan['gradient_accumulation']}",
    ]
    for zero, m in plan["memory_per_gpu_bytes"].items():
        lines.append(f"[plan] {zero}: weights {m['weights'] / gib:,.2f} GiB, gradients {m['gradients'] / gib:,.2f} GiB,"
                     f" optimizer {m['optimizer'] / gib:,.2f} GiB per GPU")
    f = plan["flops_per_token"]
    lines.append(f"[plan] training FLOPs per token: base {f['base']:.4g}, warmup {f['warmup']:.4g}, "
                 f"sparse {f['sparse']:.4g}")
    for stage, fit in plan["smallest_fit"].items():
        a = plan["activation_bytes_per_gpu"][stage]
        lines.append(f"[plan] {stage}: activations per GPU at deepspeed.context_parallel={plan['context_parallel']} "
                     f"(checkpointed layers): {a['total'] / gib:,.2f} GiB = layer inputs {a['layer_inputs'] / gib:,.2f}"
                     f" + kept top-k and lse {a['kept_per_layer'] / gib:,.2f} + one layer's working set "
                     f"{a['layer_working_set'] / gib:,.2f} + LM head chunk {a['lm_head_chunk'] / gib:,.2f}")
        if fit is None:
            lines.append(f"[plan] {stage}: nothing up to 4,096 GPUs of {plan['gpu_memory_gb']:g} GB fits")
            continue
        lines.append(f"[plan] {stage}: smallest fit on {plan['gpu_memory_gb']:g} GB GPUs (ZeRO-3, 90% of memory): "
                     f"{fit['gpus']:,} GPU(s) with deepspeed.context_parallel={fit['context_parallel']} "
                     f"({fit['states'] / gib:,.1f} GiB weights, gradients and optimizer + "
                     f"{fit['activations'] / gib:,.1f} GiB activations per GPU)")
    return "\n".join(lines)

