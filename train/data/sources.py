"""Text sources on Hugging Face `datasets`: local files, folders, globs, or a dataset in the local HF cache.

Every problem with the input stops here, before training, with the file and the problem named.
"""

from __future__ import annotations

import codecs
import glob as globlib
from dataclasses import dataclass
from pathlib import Path

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".arrow": "arrow"}
TXT_SAMPLE_BY = ("document", "paragraph", "line")


class DataError(ValueError):
    """Unusable input data; the message names the source or file and the problem."""


@dataclass
class SourceConfig:
    """One corpus. `path`: a file, folder, glob, or `hf:NAME` for a dataset already in the HF cache."""

    path: str = "???"
    text_column: str = "text"
    weight: float = 1.0             # share of sequences drawn from this source in a mixture
    split: str = "train"            # for hf:NAME
    txt_sample_by: str = "document"  # .txt files: one document per file, paragraph or line

    def validate(self, key: str) -> None:
        if self.weight <= 0:
            raise ValueError(f"{key}.weight={self.weight}; must be > 0")
        if self.txt_sample_by not in TXT_SAMPLE_BY:
            raise ValueError(f"{key}.txt_sample_by={self.txt_sample_by!r}; allowed: {', '.join(TXT_SAMPLE_BY)}")


def resolve_files(src: SourceConfig) -> list[Path]:
    """The files of a local source, sorted, all of one supported format."""
    path = Path(src.path)
    if any(ch in src.path for ch in "*?["):
        files = [Path(p) for p in sorted(globlib.glob(src.path, recursive=True)) if Path(p).is_file()]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS)
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"data source path={src.path!r}: no such file or folder")
    if not files:
        raise DataError(f"data source path={src.path!r}: matches no files with a supported extension "
                        f"({', '.join(BUILDERS)})")
    unsupported = [f for f in files if f.suffix not in BUILDERS]
    if unsupported:
        raise DataError(f"{unsupported[0]}: unsupported extension {unsupported[0].suffix!r}; "
                        f"allowed: {', '.join(BUILDERS)}")
    builders = {BUILDERS[f.suffix] for f in files}
    if len(builders) > 1:
        raise DataError(f"data source path={src.path!r}: mixes formats {sorted(builders)}; "
                        "use one source per format")
    return files


def check_utf8(file: Path, chunk_bytes: int = 1 << 20) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(file, "rb") as f:
        while chunk := f.read(chunk_bytes):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise DataError(f"{file}: not valid UTF-8 text (byte offset {offset + e.start})") from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"{file}: not valid UTF-8 text (truncated character at the end)") from None


def bad_json_line(files: list[Path]) -> None:
    """Raises a DataError naming the first file and line that is not JSON (JSON Lines: one object a line; .json:
    the whole file); returns if every file parses."""
    import json

    for f in files:
        with open(f, encoding="utf-8") as fh:
            if f.suffix == ".json":
                try:
                    json.load(fh)
                except json.JSONDecodeError as e:
                    if e.pos > 0:  # a .json file may also hold JSON Lines: check those below
                        fh.seek(0)
                    else:
                        raise DataError(f"{f}: line {e.lineno}: not valid JSON ({e.msg})") from None
                else:
                    continue
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{f}: line {n}: not valid JSON ({e.msg}, column {e.colno})") from None


def load_documents(src: SourceConfig, streaming: bool):
    """A `datasets` Dataset (or IterableDataset when streaming) whose `text_column` holds one document per row."""
    import datasets

    if src.path.startswith("hf:"):
        import huggingface_hub.constants as hub

        name = src.path[3:]
        offline = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
        datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True  # the local cache only: no hub requests
        try:
            ds = datasets.load_dataset(name, split=src.split, streaming=streaming)
        except Exception as e:  # datasets raises many types here; all mean "not usable offline"
            raise DataError(f"data source path={src.path!r}: cannot load dataset {name!r} split {src.split!r} "
                            f"from the local Hugging Face cache, and runs never download "
                            f"({type(e).__name__}: {e})") from None
        finally:
            datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = offline
        where, column = f"data source {src.path!r}", src.text_column
    else:
        files = resolve_files(src)
        builder = BUILDERS[files[0].suffix]
        if builder in ("json", "text"):
            for f in files:
                check_utf8(f)
        kwargs = {"sample_by": src.txt_sample_by} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                       streaming=streaming, **kwargs)
        except Exception as e:
            if builder == "json":
                bad_json_line(files)
            raise DataError(f"{files[0] if len(files) == 1 else src.path}: cannot be read as {builder} "
                            f"({type(e).__name__}: {e})") from None
        where = str(files[0]) if len(files) == 1 else f"data source {src.path!r}"
        column = "text" if builder == "text" else src.text_column  # the text builder names its column "text"
    first = next(iter(ds), None)
    if first is None:
        raise DataError(f"{where}: empty (no documents)")
    if column not in first:
        raise DataError(f"{where}: has no column {column!r} (columns: {', '.join(first)}); "
                        "set text_column for this source")
    return ds, column
