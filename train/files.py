"""Writing model directories safely: a directory appears complete or not at all, with its safetensors index."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(dst: Path) -> None:
    """Removes `.<name>.tmp-<pid>` folders beside `dst` left by writers that died (their pid is gone)."""
    for tmp in dst.parent.glob(f".{dst.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_directory(dst: str | os.PathLike, replace: bool = True):
    """Yields a temporary folder beside `dst`; on success it becomes `dst` by a rename (an existing `dst` is
    replaced, or with `replace=False` kept as it is and the call fails before anything is written), on failure
    it is removed: nothing half-written stays behind."""
    dst = Path(dst)
    if dst.exists() and not replace:
        raise FileExistsError(f"{dst}: exists; give a new directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def write_shard_index(folder: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    """`model.safetensors.index.json`, as `save_pretrained` writes it: which shard holds each tensor."""
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def safetensors_weight_map(folder: str | os.PathLike) -> dict[str, str]:
    """Which file of a checkpoint directory holds each tensor: its index, or every *.safetensors file's header."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    from safetensors import safe_open

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: file.name for k in f.keys()})
    return out
