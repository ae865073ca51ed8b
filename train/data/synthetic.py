"""The embedded default corpus: key-value recall buried in filler, so that attention must reach far back.

A document is a stream of filler words in which facts `SET k17 = v203` are stated and, hundreds to
thousands of words later, queried: `GET k17 = v203`. The value after `GET k17 =` can only be predicted by
retrieving the matching `SET` (chance: 1 / num_values), so attention patterns are sharp and a sparse
selection that misses the fact shows up directly as lost retrieval accuracy.

Its tokenizer (`build_tokenizer`) is word-level over exactly this vocabulary, saved with every model we
build on it, so later stages load it from the checkpoint like any other model's tokenizer.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

SPECIALS = ["<eos>", "<unk>"]
MARKERS = ["SET", "GET", "="]


@dataclass
class SyntheticConfig:
    """Shape of the generated corpus (defaults: about 4M training tokens, a few seconds to generate)."""

    num_train_docs: int = 4000
    num_valid_docs: int = 64
    doc_words: int = 1023          # words per document (one word = one token): with <eos>, one 1024-token sequence
    num_filler: int = 256          # filler vocabulary
    num_keys: int = 512
    num_values: int = 128
    facts_per_doc: int = 16        # each GET comes about half a document after its SET
    seed: int = 1234


def vocabulary(cfg: SyntheticConfig) -> list[str]:
    return (SPECIALS + MARKERS + [f"w{i}" for i in range(cfg.num_filler)] + [f"k{i}" for i in range(cfg.num_keys)]
            + [f"v{i}" for i in range(cfg.num_values)])


def make_document(rng: random.Random, cfg: SyntheticConfig) -> str:
    """One document: filler with `facts_per_doc` SET statements in slots of 4 words, all before their GETs."""
    words = [f"w{rng.randrange(cfg.num_filler)}" for _ in range(cfg.doc_words)]
    keys = rng.sample(range(cfg.num_keys), cfg.facts_per_doc)
    span = cfg.doc_words - 4
    slots = sorted(rng.sample(range(0, span, 4), 2 * cfg.facts_per_doc))  # non-overlapping 4-word slots
    sets, gets = slots[: cfg.facts_per_doc], slots[cfg.facts_per_doc :]
    for key, s_pos, g_pos in zip(keys, sets, gets):
        value = f"v{rng.randrange(cfg.num_values)}"
        words[s_pos : s_pos + 4] = ["SET", f"k{key}", "=", value]
        words[g_pos : g_pos + 4] = ["GET", f"k{key}", "=", value]
    return " ".join(words)


def generate(out_dir: str | os.PathLike, cfg: SyntheticConfig) -> dict[str, Path]:
    """Writes train.jsonl and valid.jsonl ({"text": ...} per line) under out_dir, atomically; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, num_docs, seed in (("train", cfg.num_train_docs, cfg.seed), ("valid", cfg.num_valid_docs, cfg.seed + 1)):
        rng = random.Random(seed)
        path = out / f"{split}.jsonl"
        tmp = path.with_suffix(f".jsonl.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            for _ in range(num_docs):
                f.write(json.dumps({"text": make_document(rng, cfg)}) + "\n")
        os.replace(tmp, path)
        paths[split] = path
    return paths


def build_tokenizer(cfg: SyntheticConfig = SyntheticConfig()):
    """A word-level `PreTrainedTokenizerFast` over the synthetic vocabulary (unknown words -> <unk>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(vocabulary(cfg))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def retrieval_targets(input_ids: list[int] | "torch.Tensor", tokenizer) -> list[int]:  # noqa: F821
    """Positions t whose next token is a retrievable value: input_ids[t-2:t+1] == GET k =."""
    ids = input_ids.tolist() if hasattr(input_ids, "tolist") else list(input_ids)
    get_id, eq_id = tokenizer.convert_tokens_to_ids(["GET", "="])
    return [t for t in range(2, len(ids) - 1) if ids[t] == eq_id and ids[t - 2] == get_id]
