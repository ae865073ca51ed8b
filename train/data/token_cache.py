"""Tokenised sources on disk: each (source, tokenizer) pair is tokenised once and memory-mapped by every rank.

A cache entry is a folder `<data.cache_dir>/<key>/` with `tokens.bin` (int32, the documents' tokens, each
followed by the end-of-document token, in source order), `offsets.npy` (int64, document i is
tokens[offsets[i]:offsets[i + 1]]) and `meta.json`. The key hashes what determines the tokens: the source's
files (path, size, modification time) or its HF dataset fingerprint, its column and txt splitting, the
tokenizer (class, vocabulary, end-of-document id, and a fast tokenizer's whole definition), and this format's
version. An entry is built in a
temporary folder and renamed into place, so a half-written one is never read; builders racing on a shared
file system each rename a complete copy, and the first wins.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from train.data.sources import DataError, SourceConfig, resolve_files
from train.files import remove_stale_temporaries

FORMAT = 1


def _tokenizer_fingerprint(tokenizer) -> dict:
    vocab = sorted(tokenizer.get_vocab().items())
    fp = {"class": type(tokenizer).__name__, "size": len(tokenizer), "eos": tokenizer.eos_token_id,
          "vocab_sha256": hashlib.sha256(json.dumps(vocab).encode()).hexdigest()}
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers: normaliser, merges, templates
    if backend is not None:
        fp["backend_sha256"] = hashlib.sha256(backend.to_str().encode()).hexdigest()
    return fp


def _source_fingerprint(src: SourceConfig, dataset) -> dict:
    fp = {"path": src.path, "text_column": src.text_column, "txt_sample_by": src.txt_sample_by}
    if src.path.startswith("hf:"):
        fp.update(split=src.split, dataset=getattr(dataset, "_fingerprint", None))
    else:
        fp["files"] = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in resolve_files(src)]
    return fp


def entry_folder(cache_dir: str | os.PathLike, src: SourceConfig, dataset, tokenizer) -> Path:
    """Where the entry of `src` under `tokenizer` lives (`dataset` is read only for hf: sources)."""
    what = {"format": FORMAT, "source": _source_fingerprint(src, dataset),
            "tokenizer": _tokenizer_fingerprint(tokenizer)}
    return Path(cache_dir) / hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def is_complete(folder: Path) -> bool:
    return (folder / "meta.json").exists()


class TokenCache:
    """One source's documents as token arrays: `tokens` (memory-mapped int32) and `offsets` (int64)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.offsets = np.load(folder / "offsets.npy")
        n = int(self.offsets[-1])
        self.tokens = (np.memmap(folder / "tokens.bin", dtype=np.int32, mode="r", shape=(n,)) if n
                       else np.zeros(0, np.int32))

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


def build(folder: Path, documents, what: str) -> None:
    """Tokenises `documents` (an iterable of int token arrays) into the entry `folder`, atomically."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    offsets, n, t0, t_print = [0], 0, time.time(), time.time()
    try:
        with open(tmp / "tokens.bin", "wb") as f:
            for doc in documents:
                f.write(np.asarray(doc, dtype=np.int32).tobytes())
                n += len(doc)
                offsets.append(n)
                if time.time() - t_print > 30:
                    print(f"[data] tokenising {what}: {len(offsets) - 1:,} documents, {n:,} tokens "
                          f"({time.time() - t0:.0f} s)", flush=True)
                    t_print = time.time()
    except BaseException:  # a bad document, a full disk: nothing half-built stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "source": what, "documents": len(offsets) - 1,
                                               "tokens": n}, indent=1))
    try:
        os.rename(tmp, folder)
    except OSError:  # another builder renamed its copy first
        if not (folder / "meta.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[data] tokenised {what}: {len(offsets) - 1:,} documents, {n:,} tokens in {time.time() - t0:.0f} s "
          f"-> {folder}", flush=True)


def load_or_build(folder: Path, src: SourceConfig, documents, build_missing: bool = True) -> TokenCache:
    """The cache entry `folder` of `src`: built from `documents()` (a callable) if missing, or, with
    build_missing=False, waited for (another process of this node builds it; a launcher stops the waiters
    if that process fails)."""
    if not is_complete(folder):
        if build_missing:
            folder.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(folder)  # left by a killed tokenisation
            build(folder, documents(), f"data source path={src.path!r}")
        t0 = time.time()
        while not is_complete(folder):
            time.sleep(1.0)
            if int(time.time() - t0) % 60 == 0:
                print(f"[data] waiting for the tokenisation of data source path={src.path!r} ({folder})", flush=True)
    cache = TokenCache(folder)
    if cache.num_docs == 0:
        raise DataError(f"data source path={src.path!r}: no documents")
    return cache
