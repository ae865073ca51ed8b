"""The embedded default corpus: key-value recall buried in filler, so that attention must reach far back.

A document is `recall_distance` (256) random filler words with facts `SET k17 v9` among them, then the
same words replayed. Every token of the replay, each fact's value included, can only be predicted by
retrieving the one token 255 positions back (chance for a value: 1 / num_values), so attention patterns
are sharp and a sparse selection that misses that token shows up directly as lost accuracy. Retrieval
accuracy is measured on the replayed facts' values.

Why this shape: a small model on 2 CPU cores learns this lookup within minutes (the loss drops sharply
after a few hundred steps), while sparse facts queried in random order at random distances (content-
addressed recall, an induction circuit) stayed at chance after 1,500 steps in our trials.

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
MARKERS = ["SET"]


@dataclass
class SyntheticConfig:
    """Shape of the generated corpus (defaults: about 4M training tokens, a few seconds to generate)."""

    num_train_docs: int = 8000
    num_valid_docs: int = 64
    doc_words: int = 511           # words per document (one word = one token): with <eos>, one 512-token sequence
    num_filler: int = 256          # filler vocabulary
    num_keys: int = 256
    num_values: int = 64
    facts_per_doc: int = 40
    recall_distance: int = 256     # words from a SET to its GET
    seed: int = 1234


def vocabulary(cfg: SyntheticConfig) -> list[str]:
    return (SPECIALS + MARKERS + [f"w{i}" for i in range(cfg.num_filler)] + [f"k{i}" for i in range(cfg.num_keys)]
            + [f"v{i}" for i in range(cfg.num_values)])


def make_document(rng: random.Random, cfg: SyntheticConfig) -> str:
    """One document of `doc_words` words: filler with `SET k v` facts in its first `recall_distance` words,
    then those words replayed (any words past the replay are fresh filler)."""
    n = cfg.doc_words
    words = [f"w{rng.randrange(cfg.num_filler)}" for _ in range(n)]
    span = min(cfg.recall_distance, n - cfg.recall_distance) - 3
    keys = rng.sample(range(cfg.num_keys), cfg.facts_per_doc)
    slots = sorted(rng.sample(range(0, span, 3), cfg.facts_per_doc))  # non-overlapping 3-word slots
    for key, pos in zip(keys, slots):
        words[pos : pos + 3] = ["SET", f"k{key}", f"v{rng.randrange(cfg.num_values)}"]
    d = cfg.recall_distance
    words[d : 2 * d] = words[: min(d, n - d)]  # the replay
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


def retrieval_targets(input_ids, recall_distance: int = SyntheticConfig.recall_distance) -> list[int]:
    """Positions t whose next token is a replayed one: input_ids[t+1] == input_ids[t+1-recall_distance].

    In the replay every token (filler, marker, key, value) is determined by the token `recall_distance`
    back and by nothing else, so next-token accuracy there is retrieval accuracy (chance ~ 1/256).
    """
    ids = input_ids.tolist() if hasattr(input_ids, "tolist") else list(input_ids)
    d = recall_distance
    return [t for t in range(d - 1, len(ids) - 1) if ids[t + 1] == ids[t + 1 - d]]
