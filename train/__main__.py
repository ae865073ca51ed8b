"""Hydra entry point: `python -m train [overrides]` (or under deepspeed / torchrun): compose, build, run a stage."""

import os
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from train.config import TrainConfig, from_hydra

# The typed schema under conf/config.yaml: every key exists, so any key can be overridden, and types are checked.
ConfigStore.instance().store(name="train_schema", node=TrainConfig)

def _die_with_launcher() -> None:
    """A rank started by a launcher (torchrun, the DeepSpeed launcher: LOCAL_RANK is set) ends when the launcher
    does, instead of training on as an orphan that writes into a run directory a relaunch then uses."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the launcher died before the line above
        os._exit(1)


_die_with_launcher()

# The DeepSpeed launcher appends --local_rank=N, which Hydra rejects; the rank is in the environment too.
sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]


def _check_additions() -> None:
    from train.config import check_additions

    try:
        check_additions(sys.argv[1:])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(2)


def _os_error(e: OSError) -> str:
    """A file-system failure in one line: the path, what happened, what to do."""
    import errno

    hint = {errno.ENOSPC: "the disk is full: free space, or point run.root / data.cache_dir at another disk",
            errno.EDQUOT: "the disk quota is used up: free space, or point run.root at another disk",
            errno.EROFS: "the file system is read-only: point run.root / data.cache_dir at a writable directory",
            errno.EACCES: "no permission: point run.root / data.cache_dir at a directory you may write",
            errno.EPERM: "not permitted: point run.root / data.cache_dir at a directory you may write",
            errno.ENOTDIR: "a file stands where a directory is needed"}.get(e.errno)
    return f"{e.filename}: {e.strerror}" + (f"; {hint}" if hint else "")


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(raw: DictConfig) -> None:
    from train.loop import NonFiniteError, run_stage

    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = from_hydra(raw)
        run_stage(cfg, raw)
    except OmegaConfBaseException as e:  # an unknown key (`+stage.foo=1`) or a wrong type: name it, one line
        print(f"error: {str(e).splitlines()[0]} (full_key: {getattr(e, 'full_key', None)}); the typed config "
              "(train/config.py) lists every key", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
    except ValueError as e:  # config and input errors: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(3)
    except OSError as e:
        if not e.filename:
            raise
        print(f"error: {_os_error(e)}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
    sys.stdout.flush()
    sys.stderr.flush()
    # DeepSpeed's process group can abort at interpreter shutdown after ZeRO-3 (in a quarter to half of CPU runs);
    # all work is done and flushed, so leave without running it.
    os._exit(0)


if __name__ == "__main__":
    _check_additions()
    main()
