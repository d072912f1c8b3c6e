"""Files written whole or not at all, and whether the process that left one behind is still alive.

Every small file tinkerlm writes (records, reports, configs, plots, checkpoints' parts) goes through a temporary file
beside its target and one `os.replace`: a reader, or a run killed at any point, sees the old file or the new one,
never part of one, and the temporary file is removed on any failure.

    write_atomic(path, "text")              # or bytes
    write_json(path, {"a": 1})
    with atomic_path(path) as tmp:          # for writers that want a path (savefig, safetensors)
        fig.savefig(tmp, format="png")

Temporary names carry the writer's pid (`.NAME.PID-RANDOM.tmp`), so the next write of the same target removes what
a killed writer left (`pid_alive`). Large streamed outputs (GGUF and safetensors writers, store pulls) keep their own
temporary files with the same guarantee.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):  # not a pid this system could have
        return False
    return True


def _sweep(path: Path) -> None:
    """Remove temporary files of `path` whose writer is dead."""
    try:
        leftovers = list(path.parent.glob(f".{path.name}.*.tmp"))
    except OSError:
        return
    for stale in leftovers:
        pid = stale.name[len(path.name) + 2 :].partition("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block ends without an exception,
    removed when it raises (KeyboardInterrupt included)."""
    path = Path(path)
    _sweep(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (str as UTF-8) to `path` whole or not at all; returns the path."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | Path, data, indent: int = 2, **dumps) -> Path:
    """Write `data` as JSON (and a final newline) to `path` whole or not at all; `dumps` go to `json.dumps`."""
    return write_atomic(path, json.dumps(data, indent=indent, **dumps) + "\n")
