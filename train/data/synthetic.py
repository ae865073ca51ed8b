"""The embedded default corpus: key-value recall buried in filler, so that attention must reach far back.

A document states facts `SET k17 v9` among filler words and, hundreds of words later, queries them in a
fresh order: `GET k17 v9`. The value after `GET k17` can only be predicted by retrieving the matching `SET`
(chance: 1 / num_values), so attention patterns are sharp and a sparse selection that misses the fact shows
up directly as lost retrieval accuracy. Facts are dense (every query is a training signal), so that a small
model learns the lookup (an induction head) within minutes on a CPU.

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
MARKERS = ["SET", "GET"]


@dataclass
class SyntheticConfig:
    """Shape of the generated corpus (defaults: about 4M training tokens, a few seconds to generate)."""

    num_train_docs: int = 4000
    num_valid_docs: int = 64
    doc_words: int = 1023          # words per document (one word = one token): with <eos>, one 1024-token sequence
    num_filler: int = 256          # filler vocabulary
    num_keys: int = 256
    num_values: int = 64
    facts_per_doc: int = 64        # SETs fill the first half of a document, GETs (shuffled) the second
    max_filler: int = 2            # filler words after each statement
    passage_words: int = 64        # a random passage, repeated at the end
    seed: int = 1234


def vocabulary(cfg: SyntheticConfig) -> list[str]:
    return (SPECIALS + MARKERS + [f"w{i}" for i in range(cfg.num_filler)] + [f"k{i}" for i in range(cfg.num_keys)]
            + [f"v{i}" for i in range(cfg.num_values)])


def make_document(rng: random.Random, cfg: SyntheticConfig) -> str:
    """One document of `doc_words` words: `SET k v` facts, a random passage, the facts queried as `GET k v`
    in a fresh order, then the passage again; each statement is followed by 0-`max_filler` filler words.

    The repeated passage gives every later word of it an earlier occurrence to copy from: dense practice
    for the same lookup-and-copy (induction) that answers a GET, which a small model then learns in minutes.
    """
    words: list[str] = []
    keys = rng.sample(range(cfg.num_keys), cfg.facts_per_doc)
    values = {k: f"v{rng.randrange(cfg.num_values)}" for k in keys}
    passage = [f"w{rng.randrange(cfg.num_filler)}" for _ in range(cfg.passage_words)]

    def statement(marker: str, key: int) -> None:
        words.extend([marker, f"k{key}", values[key]])
        words.extend(f"w{rng.randrange(cfg.num_filler)}" for _ in range(rng.randint(0, cfg.max_filler)))

    for key in keys:
        statement("SET", key)
    words.extend(passage)
    queries = list(keys)
    rng.shuffle(queries)
    for key in queries:
        statement("GET", key)
    words.extend(passage)
    words = words[: cfg.doc_words]
    words.extend(f"w{rng.randrange(cfg.num_filler)}" for _ in range(cfg.doc_words - len(words)))
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
    """Positions t whose next token is a retrievable value: input_ids[t-1:t+1] == GET k."""
    ids = input_ids.tolist() if hasattr(input_ids, "tolist") else list(input_ids)
    get_id = tokenizer.convert_tokens_to_ids("GET")
    return [t for t in range(1, len(ids) - 1) if ids[t - 1] == get_id]
