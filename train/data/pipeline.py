"""Token streams: tokenise documents, pack them into sequences, mix sources, shard by rank, resume exactly.

Packing: each document's tokens are followed by the tokenizer's end-of-document token and the documents
are concatenated; sequence i holds stream tokens [i*L, (i+1)*L) as inputs and the next L tokens as labels,
so a document longer than `seq_len` simply continues in the next sequence, and no token is padding.
The tokens after the last full sequence of an epoch are dropped (fewer than L per source and epoch).

Order: a source's documents are shuffled per epoch (seeded) unless streaming, where they are read in file
order. A mixture picks each global sequence's source by a seeded draw on its index. Every rank builds the
same global batch and keeps its contiguous share, so 2 ranks together see exactly what 1 rank sees.
The state (sequences consumed per source and in all) is part of every checkpoint.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from train.data import token_cache
from train.data.sources import DataError, SourceConfig, load_documents
from train.data.synthetic import SyntheticConfig


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    seq_len: int = 1024
    tokenizer: str | None = None     # null: the model checkpoint's own; "synthetic": the embedded default's
    streaming: bool = False          # for corpora larger than memory: read lazily, in file order
    seed: int = 0
    synthetic: SyntheticConfig | None = None  # set: generate the embedded corpus into `generated_dir` if missing
    generated_dir: str = "data/generated/synthetic"
    cache_dir: str = "data/cache"    # tokenised sources (map-style), shared by ranks and runs (token_cache.py)
    held_out: str | None = None      # held-out text (file, folder or glob; the first source's text_column) for
                                     # stage.eval_every and `make eval`

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("data.sources is empty: give at least one source (data=synthetic for the default)")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len={self.seq_len}; must be >= 2")
        for i, src in enumerate(self.sources):
            src.validate(f"data.sources[{i}]")

    def held_out_config(self) -> "DataConfig":
        """This config reading `held_out` instead of the training sources (same tokenizer, length, cache)."""
        src = SourceConfig(path=self.held_out, text_column=self.sources[0].text_column)
        return DataConfig(sources=[src], seq_len=self.seq_len, tokenizer=self.tokenizer, seed=self.seed,
                          cache_dir=self.cache_dir)


def tokenize_batch(tokenizer, texts: list[str]) -> list[np.ndarray]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no eos_token: documents cannot be separated")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [np.asarray(x + [eos], dtype=np.int64) for x in ids]


class SourceStream:
    """Packed (L+1)-token windows of one source, deterministic for a seed; state = (epoch, index in epoch).

    Map-style sources are tokenised once into the on-disk cache (`token_cache.py`) and memory-mapped; an
    epoch is a seeded order of the documents, and window i is read from the documents it spans, so no rank
    holds the corpus in memory. Streaming sources are tokenised on the fly, in file order."""

    def __init__(self, src: SourceConfig, tokenizer, seq_len: int, seed: int, streaming: bool,
                 cache_dir: str = "data/cache"):
        self.src, self.tokenizer, self.seq_len, self.seed, self.streaming = src, tokenizer, seq_len, seed, streaming
        self.cache_dir = cache_dir
        self.dataset = self.column = None
        self._folder = None
        if not streaming and not src.path.startswith("hf:"):  # a cached file source needs no reading at all
            self._folder = token_cache.entry_folder(cache_dir, src, None, tokenizer)
        if self._folder is None or not token_cache.is_complete(self._folder):
            self._load_dataset()
        self.epoch, self.index = 0, 0
        self._cache: token_cache.TokenCache | None = None  # map-style: the tokenised documents
        self._order: np.ndarray | None = None                # this epoch's document order
        self._starts: np.ndarray | None = None               # where each document of that order starts
        self._iter = None                                    # streaming: the live packer
        self._pos: tuple[int, int] | None = None             # streaming: (document, token) of the next window

    def _load_dataset(self) -> None:
        """Opens (and checks: files, format, UTF-8, column) the source."""
        if self.dataset is None:
            self.dataset, self.column = load_documents(self.src, self.streaming)
        if self._folder is None and not self.streaming:
            self._folder = token_cache.entry_folder(self.cache_dir, self.src, self.dataset, self.tokenizer)

    def _documents(self, skip: int = 0):
        self._load_dataset()
        dataset = self.dataset.skip(skip) if skip else self.dataset
        row = skip
        for batch in dataset.iter(batch_size=256):
            texts = batch[self.column]
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise DataError(f"data source path={self.src.path!r}: document {row + i + 1}: column "
                                    f"{self.column!r} holds {'null' if text is None else type(text).__name__} "
                                    f"({str(text)[:40]}), not text; every document must be a string")
            row += len(texts)
            yield from tokenize_batch(self.tokenizer, texts)

    def load_cache(self, build_missing: bool = True) -> token_cache.TokenCache:
        """The tokenised documents; a missing cache entry is built now, or waited for (build_missing=False)."""
        if self._cache is None:
            self._cache = token_cache.load_or_build(self._folder, self.src, self._documents, build_missing)
        return self._cache

    def _load_epoch(self) -> None:
        cache = self.load_cache()
        order = list(range(cache.num_docs))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        self._order = np.asarray(order, dtype=np.int64)
        lengths = np.diff(cache.offsets)[self._order]
        self._starts = np.concatenate([[0], np.cumsum(lengths)])
        if self.num_sequences() == 0:
            raise DataError(f"data source path={self.src.path!r}: {cache.num_tokens} tokens, fewer than one "
                            f"sequence of data.seq_len={self.seq_len} (+1) tokens")

    def _epoch_slice(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of this epoch's concatenation of documents."""
        cache, parts = self._cache, []
        j = int(np.searchsorted(self._starts, start, side="right")) - 1
        while n > 0:
            doc = self._order[j]
            a = cache.offsets[doc] + (start - self._starts[j])
            take = min(int(cache.offsets[doc + 1] - a), n)
            parts.append(cache.tokens[a : a + take])
            start, n, j = start + take, n - take, j + 1
        return np.concatenate(parts).astype(np.int64)

    def num_sequences(self) -> int:
        return (int(self._starts[-1]) - 1) // self.seq_len

    def _windows_streaming(self, doc0: int, off0: int):
        """Windows from token `off0` of document `doc0` on (documents before it are skipped unread by the
        tokenizer). Before each window is handed out, `self._pos` becomes where the next one starts."""
        buf, produced = np.zeros(0, dtype=np.int64), 0
        remaining = deque()  # tokens of each document in buf, the first being document pos_doc
        pos_doc, pos_off = doc0, off0
        for i, doc in enumerate(self._documents(skip=doc0)):
            doc = doc[off0:] if i == 0 else doc  # the first document starts where the position says
            buf = np.concatenate([buf, doc])
            remaining.append(len(doc))
            while len(buf) >= self.seq_len + 1:
                window, buf = buf[: self.seq_len + 1], buf[self.seq_len :]
                step = self.seq_len
                while step:
                    if remaining[0] <= step:
                        step -= remaining.popleft()
                        pos_doc, pos_off = pos_doc + 1, 0
                    else:
                        remaining[0] -= step
                        pos_off, step = pos_off + step, 0
                self._pos = (pos_doc, pos_off)
                produced += 1
                yield window
        if produced == 0 and doc0 == 0 and off0 == 0:
            raise DataError(f"data source path={self.src.path!r}: fewer than one sequence of "
                            f"data.seq_len={self.seq_len} (+1) tokens")

    def next_window(self) -> np.ndarray:
        if self.streaming:
            if self._iter is None:
                if self._pos is not None or self.index == 0:
                    self._iter = self._windows_streaming(*(self._pos or (0, 0)))
                else:  # a checkpoint from before positions were saved: replay up to it
                    self._iter = self._windows_streaming(0, 0)
                    for _ in range(self.index):
                        next(self._iter)
            try:
                window = next(self._iter)
            except StopIteration:
                self.epoch, self.index, self._iter, self._pos = self.epoch + 1, 0, None, None
                return self.next_window()
        else:
            if self._order is None:
                self._load_epoch()
            if self.index >= self.num_sequences():
                self.epoch, self.index = self.epoch + 1, 0
                self._load_epoch()
            window = self._epoch_slice(self.index * self.seq_len, self.seq_len + 1)
        self.index += 1
        return window

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "index": self.index}
        if self.streaming and self._pos is not None:
            state["position"] = list(self._pos)
        return state

    def load_state_dict(self, state: dict) -> None:
        reload = state["epoch"] != self.epoch
        self.epoch, self.index = state["epoch"], state["index"]
        self._iter = None
        self._pos = tuple(state["position"]) if "position" in state else None
        if reload and self._order is not None:
            self._load_epoch()


class TokenPipeline:
    """The rank's share of each global batch: `next_batch()` -> input_ids and labels [global/world, L]."""

    def __init__(self, cfg: DataConfig, tokenizer, rank: int = 0, world_size: int = 1, sources=None):
        srcs = cfg.sources if sources is None else sources
        self.streams = [SourceStream(s, tokenizer, cfg.seq_len, cfg.seed + i, cfg.streaming, cfg.cache_dir)
                        for i, s in enumerate(srcs)]
        self.weights = [s.weight for s in srcs]
        self.seed, self.rank, self.world_size = cfg.seed, rank, world_size
        self.sequences_consumed = 0   # global, over all ranks
        self.tokens_consumed = 0      # global input tokens (no padding exists)

    def _pick_source(self, g: int) -> int:
        if len(self.streams) == 1:
            return 0
        return random.Random(self.seed * 7_919 + g).choices(range(len(self.streams)), self.weights)[0]

    def next_batch(self, global_batch: int) -> dict:
        if global_batch % self.world_size:
            raise ValueError(f"global batch {global_batch} does not divide by world size {self.world_size}")
        windows = []
        for _ in range(global_batch):
            windows.append(self.streams[self._pick_source(self.sequences_consumed)].next_window())
            self.sequences_consumed += 1
        per_rank = global_batch // self.world_size
        mine = torch.from_numpy(np.stack(windows[self.rank * per_rank : (self.rank + 1) * per_rank]))
        self.tokens_consumed += global_batch * (mine.shape[1] - 1)
        return {"input_ids": mine[:, :-1].contiguous(), "labels": mine[:, 1:].contiguous(),
                "num_tokens": per_rank * (mine.shape[1] - 1), "global_tokens": global_batch * (mine.shape[1] - 1)}

    def prepare(self, build_missing: bool = True) -> None:
        """Loads every map-style source's tokens now, tokenising missing ones (build_missing) or waiting for
        another process to (training: one rank per node builds, its other ranks wait)."""
        for stream in self.streams:
            if not stream.streaming:
                stream.load_cache(build_missing)

    @property
    def epochs(self) -> list[int]:
        return [s.epoch for s in self.streams]

    def state_dict(self) -> dict:
        return {"sequences_consumed": self.sequences_consumed, "tokens_consumed": self.tokens_consumed,
                "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["streams"]) != len(self.streams):
            raise ValueError(f"checkpoint has {len(state['streams'])} data sources, the config {len(self.streams)}")
        self.sequences_consumed, self.tokens_consumed = state["sequences_consumed"], state["tokens_consumed"]
        for stream, s in zip(self.streams, state["streams"]):
            stream.load_state_dict(s)


def load_tokenizer(cfg: DataConfig, model_path: str | None):
    """The tokenizer named by `data.tokenizer`, or the model checkpoint's own."""
    from train.data.synthetic import build_tokenizer

    if cfg.tokenizer == "synthetic":
        return build_tokenizer(cfg.synthetic or SyntheticConfig())
    path = cfg.tokenizer or model_path
    if path is None:
        raise ValueError("data.tokenizer is null and the model has no checkpoint directory (model.path): "
                         "set data.tokenizer to a tokenizer directory or 'synthetic'")
    from transformers import AutoTokenizer

    from train.model.hf import own_export

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=own_export(path))
    except Exception as e:
        raise DataError(f"tokenizer at {path!r} cannot be loaded ({type(e).__name__}: {e})") from None


def check_tokenizer_fits(tokenizer, vocab_size: int, where: str) -> None:
    n = len(tokenizer)
    if n > vocab_size:
        raise DataError(f"tokenizer {where!r} has {n} tokens but the model's vocab_size is {vocab_size}: "
                        "they do not belong together")


def ensure_generated(cfg: DataConfig) -> None:
    """Generates the embedded synthetic corpus when the config asks for it and it is missing."""
    from pathlib import Path

    from train.data.synthetic import generate

    if cfg.synthetic is None:
        return
    out = Path(cfg.generated_dir)
    if not (out / "train.jsonl").exists() or not (out / "valid.jsonl").exists():
        print(f"[data] generating the synthetic corpus in {out}/ ...", flush=True)
        generate(out, cfg.synthetic)
