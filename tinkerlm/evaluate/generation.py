"""Generation tasks: each prompt answered greedily, the answer scored against a reference.

A task's items (tinkerlm.evaluate.tasks.GenerationItem, read from a user's JSONL file) are rendered as the model
sees them: a chat line through the model's own chat template (the conversation up to the reference answer, with a
generation prompt), a text line as plain text (BOS added where the tokenizer adds one). Answers are greedy
(temperature 0, no penalties; the model's generation_config sampling defaults are not applied), batched through
tinkerlm.generate.stream_generate, and stop at an end-of-sequence token, a line's stop strings or its token budget.

Every answer, stripped of surrounding whitespace, gets three scores (as examples/skills/score.py's `judge`):

    exact  the item passes its scoring rule (the headline): "exact" the answer equals the reference; "regex" it
           matches the pattern entirely; "json" it parses as JSON equal to the reference; "json_field" it parses as
           JSON whose field equals the reference's
    json   the answer parses as JSON equal to the reference; None when the reference is not a JSON object or array
    found  the answer holds the answer somewhere: the reference as a substring (JSON references: a {...} span of
           the answer that parses equal; "regex": re.search; "json_field": a {...} span with the field equal),
           i.e. the model knew the answer but wrapped it in other text

JSON values are compared by value with key order and spacing ignored, and with types kept (true is not 1).

examples/skills/score.py (the skills demo's scorer) answers and judges through this module, so `tinkerlm eval` on a
skills eval file gives its numbers. Both keep its original algorithm: the chat template with no BOS added, the
default budget (the longest reference in tokens + 24), batches made by sorting prompts by token length and cutting
them into `batch_size` rows, and its comparisons; tests/test_eval_generation.py checks score_generation's answers
and numbers on SmolLM2 against that original loop. (One change: a JSON-array reference the whole answer equals now
counts as found; the original looked only inside {...} spans.)
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence

from tinkerlm.errors import TinkerError
from tinkerlm.evaluate.tasks import GenerationItem, Task, json_path

MARGIN = 24  # default budget: the longest reference in tokens + MARGIN (room for a wrapped answer to show it)
MAX_BUDGET = 1024  # ... at most this
NO_REFERENCE_BUDGET = 256  # when no item of the task has a reference (regex lines only)

_INVALID = object()  # what an unparsable text "parses" to: equal to no JSON value


def parse_json(text: str):
    """The JSON value of `text`, or a sentinel equal to nothing."""
    try:
        return json.loads(text)
    except ValueError:
        return _INVALID


def same(a, b) -> bool:
    """Whether two parsed JSON values are equal, types kept: true != 1, "1" != 1 (1 == 1.0, as JSON numbers)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def embedded_json(text: str):
    """The parsed values of the balanced {...} spans of `text`, from each "{" to where its braces first balance
    (braces inside strings are counted too, as examples/skills/score.py does); spans that do not parse are skipped."""
    for i, c in enumerate(text):
        if c != "{":
            continue
        depth = 0
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                value = parse_json(text[i : j + 1])
                if value is not _INVALID:
                    yield value
                break


def _field_equal(value, path, want) -> bool:
    try:
        return same(json_path(value, path), want)
    except (LookupError, TypeError):
        return False


def judge(output: str, item: GenerationItem) -> dict:
    """{"exact": 0|1, "json": 0|1|None, "found": 0|1} of one answer (see the module docstring)."""
    answer, reference = output.strip(), item.reference
    ref = parse_json(reference) if reference else _INVALID
    is_json = isinstance(ref, (dict, list))
    parsed = parse_json(answer)
    json_score = int(same(parsed, ref)) if is_json else None
    if item.scoring == "regex":
        exact = re.fullmatch(item.pattern, answer) is not None
        found = re.search(item.pattern, answer) is not None
    elif item.scoring == "json":
        exact = same(parsed, ref)
        found = exact or any(same(v, ref) for v in embedded_json(answer))
    elif item.scoring == "json_field":
        want = json_path(ref, item.field_path)
        exact = _field_equal(parsed, item.field_path, want)
        found = exact or any(_field_equal(v, item.field_path, want) for v in embedded_json(answer))
    else:
        exact = answer == reference
        if is_json:
            found = exact or json_score == 1 or any(same(v, ref) for v in embedded_json(answer))
        else:
            found = reference in answer
    return {"exact": int(exact), "json": json_score, "found": int(found)}


def mean_stderr(values: Sequence[float]) -> float:
    """The standard error of the mean (sample standard deviation / sqrt(n)), lm-evaluation-harness's stderr."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def records(task: Task, outputs: Sequence[str]) -> tuple[dict, list[dict]]:
    """(metrics, per-item records) of `outputs`, one answer per item of `task` in order.

    Metrics: exact, found (over all items) and json (over the items with a JSON reference, when there are any),
    each with its `_stderr`. Records: {"id", "output" (stripped), "reference", "exact", "json", "found"}.
    """
    if len(outputs) != len(task.items):
        raise ValueError(f"{task.name}: {len(outputs)} outputs for {len(task.items)} items")
    items = [
        {"id": it.id, "output": out.strip(), "reference": it.reference, **judge(out, it)}
        for it, out in zip(task.items, outputs)
    ]
    metrics: dict[str, float] = {}
    for key in ("exact", "json", "found"):
        values = [r[key] for r in items if r[key] is not None]
        if values:
            metrics[key] = sum(values) / len(values)
            metrics[f"{key}_stderr"] = mean_stderr(values)
    return metrics, items


def default_budget(tokenizer, items: Sequence[GenerationItem]) -> int:
    """Tokens to generate for items without their own max_tokens: the longest reference + MARGIN, at most
    MAX_BUDGET; NO_REFERENCE_BUDGET when no item has a reference."""
    lengths = [len(tokenizer.encode(it.reference, add_special_tokens=False)) for it in items if it.reference]
    return min(max(lengths) + MARGIN, MAX_BUDGET) if lengths else NO_REFERENCE_BUDGET


def prompt_ids(llm, task: Task, item: GenerationItem) -> list[int]:
    """The token ids the model is given for `item` (few-shot examples included)."""
    given = task.generation_input(item)
    if isinstance(given, str):
        return llm.tokenizer.encode(given)
    return llm.chat_ids(given)  # special-token text inside contents stays text


def answer(
    llm,
    prompts: Sequence[Sequence[int]],
    max_tokens: Sequence[int],
    stops: Sequence[Sequence[str]] | None = None,
    *,
    batch_size: int = 16,
    progress: bool | Callable[[int, int], None] = False,
) -> list[str]:
    """Greedy answers to token-id prompts, in order. Prompts with the same budget and stop strings are sorted by
    length (stable) and answered `batch_size` at a time (similar lengths share a batch: less padding)."""
    from tinkerlm.generate import stream_generate
    from tinkerlm.sampling import SamplingParams

    if not isinstance(batch_size, int) or batch_size < 1:
        raise TinkerError(f"batch_size must be a positive integer (got {batch_size!r})")
    stops = stops or [()] * len(prompts)
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(max_tokens, map(tuple, stops))):
        groups.setdefault(key, []).append(i)
    answers = [""] * len(prompts)
    done, t0 = 0, time.perf_counter()
    for (budget, stop), members in groups.items():
        order = sorted(members, key=lambda i: len(prompts[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            for chunk in stream_generate(
                llm.model,
                llm.tokenizer,
                [prompts[i] for i in rows],
                max_tokens=budget,
                sampling=SamplingParams(),
                stop=list(stop),
            ):
                answers[rows[chunk.index]] += chunk.text
            done += len(rows)
            if callable(progress):
                progress(done, len(prompts))
            elif progress:
                rate = done / max(time.perf_counter() - t0, 1e-9)
                eta = (len(prompts) - done) / rate
                print(
                    f"\rgenerating {done}/{len(prompts)}  {rate:.2f} answers/s  ETA {eta:.0f}s", end="", file=sys.stderr
                )
    if progress is True and prompts:
        print(file=sys.stderr)
    return answers


def score_generation(
    llm, task: Task, *, batch_size: int = 16, progress: bool | Callable[[int, int], None] = False
) -> tuple[dict, list[dict], str]:
    """Answer every item of a generation task greedily and score the answers.

    Args:
        llm: a loaded model (`tinkerlm.load(...)`).
        task: a task of kind "generate" (`tinkerlm.evaluate.tasks.load_task("my.jsonl")`).
        batch_size: prompts answered together.
        progress: True prints answers done, rate and ETA to stderr; a callable gets (done, total) after each batch.
    Returns:
        (metrics, per-item records, the headline metric "exact"); see `records`.
    Raises:
        TinkerError: the task is not a generation task, a prompt does not fit the model's context (naming the item),
            the model has no chat template for a chat line.
    """
    if getattr(task, "kind", "multiple_choice") != "generate":
        raise TinkerError(f"{task.name}: not a generation task (kind {task.kind!r})")
    prompts = [prompt_ids(llm, task, it) for it in task.items]
    limit = llm.model.max_context
    for it, ids in zip(task.items, prompts):
        if len(ids) >= limit:
            raise TinkerError(
                f"{task.name}: item {it.id}: its prompt is {len(ids)} tokens, the model's context is {limit} "
                "(shorten it, or use fewer shots)"
            )
    default = default_budget(llm.tokenizer, task.items)
    budgets = [it.max_tokens or default for it in task.items]
    outputs = answer(llm, prompts, budgets, [it.stop for it in task.items], batch_size=batch_size, progress=progress)
    metrics, items = records(task, outputs)
    return metrics, items, "exact"
