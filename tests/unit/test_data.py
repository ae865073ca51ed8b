"""Data pipeline: format equivalence, rank sharding, exact resume, token accounting, clear errors."""

import dataclasses
import json
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

import pandas as pd
import pytest
import torch

from train.data import DataConfig, DataError, SourceConfig, SyntheticConfig, TokenPipeline, load_tokenizer
from train.data.pipeline import check_tokenizer_fits
from train.data.synthetic import build_tokenizer, generate, make_document, retrieval_targets

SYN = SyntheticConfig(num_train_docs=12, num_valid_docs=2, doc_words=90, num_keys=64, facts_per_doc=4, recall_distance=45)


@pytest.fixture
def docs():
    import random

    rng = random.Random(0)
    return [make_document(rng, SYN) for _ in range(12)]


@pytest.fixture
def tok():
    return load_tokenizer(DataConfig(tokenizer="synthetic", synthetic=SYN), None)


def _cfg(path, **kw):
    kw.setdefault("cache_dir", str(Path(path).parent / "token_cache"))
    return DataConfig(sources=[SourceConfig(path=str(path), **kw.pop("src", {}))], seq_len=32, tokenizer="synthetic",
                      synthetic=SYN, **kw)


def _stream(pipe, steps, global_batch=4):
    return [pipe.next_batch(global_batch)["input_ids"] for _ in range(steps)]


def test_jsonl_parquet_txt_give_the_same_stream(docs, tok, tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    pd.DataFrame({"body": docs}).to_parquet(tmp_path / "a.parquet")
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i:03d}.txt").write_text(d)
    streams = [
        _stream(TokenPipeline(_cfg(tmp_path / "a.jsonl"), tok), 6),
        _stream(TokenPipeline(_cfg(tmp_path / "a.parquet", src={"text_column": "body"}), tok), 6),
        _stream(TokenPipeline(_cfg(tmp_path / "txt"), tok), 6),
    ]
    for other in streams[1:]:
        assert all(torch.equal(a, b) for a, b in zip(streams[0], other))
    assert len({t.item() for b in streams[0] for t in b.flatten()}) > 20  # real, varied tokens


def test_ranks_partition_the_global_batch_and_count_tokens(docs, tok, tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    one = TokenPipeline(_cfg(tmp_path / "a.jsonl"), tok)
    r0, r1 = (TokenPipeline(_cfg(tmp_path / "a.jsonl"), tok, rank=r, world_size=2) for r in (0, 1))
    total_tokens = 0
    for _ in range(40):  # several epochs
        full = one.next_batch(4)
        a, b = r0.next_batch(4), r1.next_batch(4)
        assert torch.equal(torch.cat([a["input_ids"], b["input_ids"]]), full["input_ids"])
        assert torch.equal(torch.cat([a["labels"], b["labels"]]), full["labels"])
        assert torch.equal(full["labels"][:, :-1], full["input_ids"][:, 1:])
        assert a["num_tokens"] + b["num_tokens"] == full["num_tokens"] == full["input_ids"].numel()
        total_tokens += full["input_ids"].numel()
    assert one.tokens_consumed == total_tokens == r0.tokens_consumed
    assert one.epochs[0] >= 2


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_continues_identically(docs, tok, tmp_path, streaming):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in reversed(docs)))
    cfg = lambda: DataConfig(  # noqa: E731  (a weighted mixture of two sources)
        sources=[SourceConfig(path=str(tmp_path / "a.jsonl"), weight=3), SourceConfig(path=str(tmp_path / "b.jsonl"))],
        seq_len=32, tokenizer="synthetic", synthetic=SYN, streaming=streaming, seed=5)
    straight = TokenPipeline(cfg(), tok)
    want = _stream(straight, 30)
    first = TokenPipeline(cfg(), tok)
    _stream(first, 13)
    state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
    resumed = TokenPipeline(cfg(), tok)
    resumed.load_state_dict(state)
    got = _stream(resumed, 17)
    assert all(torch.equal(a, b) for a, b in zip(want[13:], got))
    if streaming:  # a checkpoint without positions (older format) replays up to its index instead
        for s in state["streams"]:
            assert s.pop("position")[0] > 0  # the resume above skipped whole documents unread
        old = TokenPipeline(cfg(), tok)
        old.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(want[13:], _stream(old, 17)))


def test_streaming_resume_does_not_tokenise_what_was_consumed(docs, tok, tmp_path, monkeypatch):
    from train.data import pipeline

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs * 3))
    cfg = _cfg(tmp_path / "a.jsonl", streaming=True)
    first = TokenPipeline(cfg, tok)
    want = _stream(first, 20)
    mid = TokenPipeline(cfg, tok)
    _stream(mid, 15)
    state = mid.state_dict()
    tokenised = []
    real = pipeline.tokenize_batch
    monkeypatch.setattr(pipeline, "tokenize_batch", lambda t, texts: tokenised.extend(texts) or real(t, texts))
    resumed = TokenPipeline(cfg, tok)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(want[15:], _stream(resumed, 5)))
    skipped = state["streams"][0]["position"][0]
    assert skipped > 10 and len(tokenised) <= 3 * len(docs) - skipped  # the skipped ones were never tokenised


def test_bad_inputs_name_the_file_and_problem(tok, tmp_path):
    def fails(cfg, *needles):
        with pytest.raises(DataError) as e:
            TokenPipeline(cfg, tok).next_batch(1)
        for n in needles:
            assert n in str(e.value), str(e.value)

    fails(_cfg(tmp_path / "missing.jsonl"), "missing.jsonl", "no such file")
    (tmp_path / "empty.jsonl").write_text("")
    fails(_cfg(tmp_path / "empty.jsonl"), "empty.jsonl")
    (tmp_path / "col.jsonl").write_text(json.dumps({"content": "SET k1 = v2"}) + "\n")
    fails(_cfg(tmp_path / "col.jsonl"), "col.jsonl", "no column 'text'", "content")
    (tmp_path / "bad.txt").write_bytes(b"SET k1 = v2 \xff\xfe GET")
    fails(_cfg(tmp_path / "bad.txt"), "bad.txt", "UTF-8", "byte offset 12")
    (tmp_path / "short.jsonl").write_text(json.dumps({"text": "SET k1 = v2"}) + "\n")
    fails(_cfg(tmp_path / "short.jsonl"), "short.jsonl", "fewer than one sequence")
    good = json.dumps({"text": "SET k1 = v2 " * 40}) + "\n"
    (tmp_path / "broken.jsonl").write_text(good + '{"text": "GET k1\n' + good)
    fails(_cfg(tmp_path / "broken.jsonl"), "broken.jsonl: line 2: not valid JSON")
    for name, value, what in (("null", None, "holds null"), ("number", 42, "holds int (42)")):
        (tmp_path / f"{name}.jsonl").write_text(good + json.dumps({"text": value}) + "\n")
        fails(_cfg(tmp_path / f"{name}.jsonl"), f"{name}.jsonl", "document 2: column 'text'", what)
    assert not list((tmp_path / "token_cache").glob(".*.tmp-*")), "a failed tokenisation leaves nothing behind"
    import time

    t0 = time.time()  # a dataset not in the local cache fails at once: no hub requests, no retries
    fails(_cfg("hf:someone/not-cached-here"), "hf:someone/not-cached-here", "local Hugging Face cache")
    assert time.time() - t0 < 10
    with pytest.raises(DataError, match="vocab_size is 10"):
        check_tokenizer_fits(tok, 10, "synthetic")


def test_generated_corpus_has_far_retrievals(tmp_path):
    cfg = SyntheticConfig(num_train_docs=3, num_valid_docs=1)
    tok = build_tokenizer(cfg)
    paths = generate(tmp_path, cfg)
    text = json.loads(paths["train"].read_text().splitlines()[0])["text"].split()
    d = cfg.recall_distance
    assert len(text) == cfg.doc_words and text[d : 2 * d - 1] == text[: d - 1]
    facts = [i for i, w in enumerate(text[:d]) if w == "SET"]
    assert len(facts) == cfg.facts_per_doc
    ids = tok(" ".join(text))["input_ids"]
    targets = retrieval_targets(ids, d)
    assert targets == list(range(d - 1, len(text) - 1)), "every replayed token, and nothing before the replay"
    for i in facts:  # each fact's key is stated once before its replay
        assert text[: d].count(text[i + 1]) == 1


def test_windows_equal_the_shuffled_concatenation_and_the_cache_is_reused(docs, tok, tmp_path, monkeypatch):
    """Windows read from the memory-mapped cache equal slices of the plain formula (documents tokenised with
    EOS, concatenated in the epoch's seeded order), across epochs; a second pipeline tokenises nothing."""
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    pipe = TokenPipeline(_cfg(tmp_path / "a.jsonl"), tok)
    got = [pipe.streams[0].next_window() for _ in range(150)]
    ids = [np.asarray(tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) for d in docs]
    want = []
    for epoch in range(10):
        order = list(range(len(ids)))
        random.Random(0 * 1_000_003 + epoch).shuffle(order)
        flat = np.concatenate([ids[i] for i in order])
        want += [flat[i * 32 : i * 32 + 33] for i in range((len(flat) - 1) // 32)]
    assert pipe.streams[0].epoch >= 2  # the comparison spans epoch boundaries
    assert all(np.array_equal(a, b) for a, b in zip(got, want))

    calls = []
    monkeypatch.setattr(tok.__class__, "__call__", lambda *a, **k: calls.append(1) or pytest.fail("tokenised"))
    again = TokenPipeline(_cfg(tmp_path / "a.jsonl"), tok)
    assert all(np.array_equal(again.streams[0].next_window(), w) for w in got[:10]) and not calls
    assert again.streams[0].dataset is None  # a cached file source is not even opened
    assert len(list((tmp_path / "token_cache").iterdir())) == 1


def test_token_cache_follows_the_source_and_waiters_get_the_builders_entry(docs, tok, tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    first = TokenPipeline(_cfg(src), tok).streams[0].load_cache()
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:6]))  # edited: a new entry
    second = TokenPipeline(_cfg(src), tok).streams[0].load_cache()
    assert (first.num_docs, second.num_docs) == (12, 6) and first.folder != second.folder
    other_tok = load_tokenizer(DataConfig(tokenizer="synthetic", synthetic=dataclasses.replace(SYN, num_keys=32)), None)
    assert TokenPipeline(_cfg(src), other_tok).streams[0].load_cache().folder not in (first.folder, second.folder)

    other = _cfg(src, cache_dir=str(tmp_path / "fresh"))
    waiter, builder = TokenPipeline(other, tok), TokenPipeline(other, tok)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = builder.streams[0]._folder.with_name(f".{builder.streams[0]._folder.name}.tmp-{int(dead.stdout)}")
    stale.mkdir(parents=True)  # what a killed tokenisation leaves
    done = []
    t = threading.Thread(target=lambda: done.append(waiter.streams[0].load_cache(build_missing=False)))
    t.start()
    t.join(1.5)
    assert t.is_alive() and not done  # a rank that must not build waits
    builder.prepare()
    t.join(10)
    assert done and np.array_equal(np.asarray(done[0].tokens), np.asarray(second.tokens))
    assert not stale.exists()
