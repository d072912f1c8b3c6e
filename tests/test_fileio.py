"""Whole-file writes (tinkerlm/fileio.py): the old file or the new one, never part of one, nothing left behind by a
failed write, and a killed writer's temporary file removed by the next write of the same target."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tinkerlm import fileio

ROOT = Path(__file__).resolve().parent.parent


def test_writes_text_bytes_and_json(tmp_path):
    assert fileio.write_atomic(tmp_path / "a.txt", "héllo\n").read_bytes() == "héllo\n".encode()
    assert fileio.write_atomic(tmp_path / "b.bin", b"\x00\xff").read_bytes() == b"\x00\xff"
    assert fileio.write_json(tmp_path / "c.json", {"b": 1, "a": [2]}, sort_keys=True).read_text() == (
        '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = fileio.write_atomic(tmp_path / "record.json", "old")
    for error in (OSError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with fileio.atomic_path(path) as tmp:
                tmp.write_text("half of the new")
                raise error
        assert path.read_text() == "old"
        assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


KILLED = """
import os, signal, sys
from tinkerlm import fileio
with fileio.atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)
"""

LIVE = """
import sys, time
from tinkerlm import fileio
with fileio.atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("in progress")
    print(tmp, flush=True)
    time.sleep(60)
"""


def test_a_killed_writers_temp_is_swept_and_a_live_ones_kept(tmp_path):
    path = tmp_path / "loss.csv"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILLED, str(path)], env=env)
    assert killed.returncode == -signal.SIGKILL
    (dead,) = tmp_path.glob(".loss.csv.*.tmp")
    live = subprocess.Popen([sys.executable, "-c", LIVE, str(path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        busy = Path(live.stdout.readline().strip())
        fileio.write_atomic(path, "step,loss\n")
        assert path.read_text() == "step,loss\n"
        assert not dead.exists()  # its writer is gone
        assert busy.read_text() == "in progress"  # its writer is still at work
    finally:
        live.kill()
        live.wait()


def test_pid_alive():
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert fileio.pid_alive(os.getpid())
    assert not fileio.pid_alive(int(child.stdout))  # exited and reaped
    assert not fileio.pid_alive(1 << 40)
