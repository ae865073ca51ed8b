"""A source checkpoint the way a user brings one: a small model of a supported family (a MoE `DeepseekV3ForCausalLM`
with YaRN; a Qwen3 with GQA; a DeepSeek-V2-Lite-style MLA without a query latent), saved in bf16 with a byte-level
BPE tokenizer trained by `tokenizers` on real text, and that text as a jsonl corpus."""

import json
from pathlib import Path

import torch

from tests.conftest import tiny

TEXT = Path(__file__).resolve().parents[1] / "data" / "shakespeare.txt"

# The families a user brings most, at a size that learns the corpus a little in 30 steps: a MoE DeepSeek-V3 with
# YaRN, a Qwen3 (GQA 4 -> 2, q/k norms), DeepSeek-V2-Lite's MLA without a query latent (MoE after layer 1).
_SIZE = dict(vocab_size=512, intermediate_size=128, num_hidden_layers=4, max_position_embeddings=2048,
             tie_word_embeddings=False)
USER_ARCHS = {
    "deepseek_v3": tiny("deepseek_v3", **_SIZE, n_group=1, q_lora_rank=32, qk_rope_head_dim=16, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}),
    "qwen3": tiny("qwen3", **_SIZE),
    "deepseek_v2": tiny("deepseek_v2", **_SIZE),
}


def documents() -> list[str]:
    """The text's speeches (paragraphs), one document each."""
    return [p.strip() for p in TEXT.read_text().split("\n\n") if p.strip()]


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def build_user_source(root: Path, dtype: torch.dtype = torch.bfloat16, pretrain_steps: int = 30,
                      family: str = "deepseek_v3") -> dict:
    """Writes `root/src` (checkpoint + tokenizer), `root/corpus/train.jsonl` and `root/held_out.jsonl`; the model
    (of `family`, USER_ARCHS) is pre-trained densely for a few steps on the corpus (so that its attention is not
    uniform)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    docs = documents()
    split = len(docs) * 9 // 10
    (root / "corpus").mkdir(parents=True, exist_ok=True)
    (root / "corpus" / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:split]))
    (root / "held_out.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[split:]))
    tokenizer = train_tokenizer(docs[:split], USER_ARCHS[family]["vocab_size"])
    torch.manual_seed(0)
    arch = dict(USER_ARCHS[family])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        arch.pop("model_type"), **arch, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id))
    ids = torch.tensor([t for d in docs[:split] for t in tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    L, B = 128, 8
    g = torch.Generator().manual_seed(0)
    for _ in range(pretrain_steps):
        starts = torch.randint(0, len(ids) - L - 1, (B,), generator=g)
        batch = torch.stack([ids[s : s + L + 1] for s in starts])
        loss = model(batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    src = root / "src"
    model.to(dtype).save_pretrained(src)
    tokenizer.save_pretrained(src)
    return {"src": src, "corpus": root / "corpus", "held_out": root / "held_out.jsonl", "loss": loss.item()}
