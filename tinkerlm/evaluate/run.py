"""`tinkerlm eval`: run evaluation tasks on one model, keep per-item records, store the scores in its manifest.

    from tinkerlm.evaluate.run import evaluate
    results = evaluate("smollm2", ["arc_easy", "hellaswag"], limit=100)
    results["tasks"]["arc_easy"]["metrics"]["acc"]

Task kinds (the results format, `tinkerlm-eval/1`, is described in `evaluate`'s docstring):
- multiple_choice (`tasks.load_task`: the standard benchmarks, users' JSONL): every choice is a (context,
  continuation) request scored by `scoring.loglikelihoods`. Requests are tokenized as lm-evaluation-harness's
  HFLM does (`encode_pair`): trailing whitespace of the context moves onto the continuation, context +
  continuation is encoded whole and the continuation's ids are what follows the context's own ids; no BOS is
  added (HFLM's default for causal models), an empty context becomes the BOS token (EOS if there is none).
  acc = argmax of the log-likelihoods; acc_norm = argmax of ll / len(choice) in characters, the choice without
  its target delimiter (the harness's acc_norm, `len(str)`); acc_bytes = the same in UTF-8 bytes (the harness's
  acc_bytes). Stderr = sample standard deviation / sqrt(n) (the harness's mean_stderr).
  With chat=True the context is rendered with the model's chat template as the harness's --apply_chat_template
  without --fewshot_as_multiturn does: the task description (MMLU's) as a system message, the few-shot examples
  and the question as one user message, the generation prompt added; the choice, without its target delimiter
  (the harness drops it under a chat template), is scored as the start of the assistant's answer.
- generate (users' JSONL with generation lines): scored by `tinkerlm.evaluate.generation.score_generation`.
- perplexity: the shipped public-domain text (`perplexity.shipped_text`) or any `*.txt` file, in the windows of
  `perplexity.perplexity` (512 tokens every 256, BOS as the tokenizer adds it); items are windows with their
  total NLL (nats) and token count; metrics ppl, nll (per token), bits_per_byte.
- kl: KL(reference || model) of the next-token distributions on the shipped text, in the same windows (as
  `tinkerlm.export.verify.compare`, per window); items are windows with their mean KL.

Per-item records of store models are kept under `ROOT/evals/<model sha256>/<task>-<settings hash>.json`; with
reuse=True the same request (model digest, task, settings, task data version) reads them instead of scoring again,
so `tinkerlm compare` on models already evaluated is cheap. The summary goes into the manifest (`evaluations`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from tinkerlm.errors import TinkerError
from tinkerlm.fileio import write_json

FORMAT = "tinkerlm-eval/1"
# Bump when prompts, tokenization or metrics change (here or in tasks.py): stored records are then not reused.
DATA_VERSION = 1
PPL_CONTEXT = 512  # tokens per window of the perplexity and kl tasks (as `perplexity.perplexity`'s default)
SPECIAL_TASKS = ("perplexity", "kl")
QUANTS = ("native", "int8", "int4", "bf16", "fp32")


# ---------------------------------------------------------------------------------------------------------------
# Tokenization as lm-evaluation-harness's HFLM


def encode_pair(tokenizer, context: str, continuation: str, *, add_bos: bool = False) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness's `TemplateLM._encode_pair` with HFLM's `tok_encode`.

    Trailing whitespace of the context moves onto the continuation; `context + continuation` is encoded whole and
    the continuation is what follows the context's own ids, so the split never cuts a token the two strings share.
    An empty context is the BOS token (EOS when the tokenizer has none), the harness's `prefix_token_id`.
    `add_bos`: encode with the tokenizer's special tokens (HFLM's add_bos_token; off by default for causal models).
    """
    if not context:
        return [_prefix_token(tokenizer)], list(tokenizer.encode(continuation, add_special_tokens=add_bos))
    stripped = context.rstrip()
    if len(stripped) < len(context):
        continuation = context[len(stripped) :] + continuation
        context = stripped
    if not context:  # a context of whitespace only: all of it went onto the continuation
        return [_prefix_token(tokenizer)], list(tokenizer.encode(continuation, add_special_tokens=add_bos))
    whole = tokenizer.encode(context + continuation, add_special_tokens=add_bos)
    context_ids = tokenizer.encode(context, add_special_tokens=add_bos)
    return list(context_ids), list(whole[len(context_ids) :])


def _prefix_token(tokenizer) -> int:
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise TinkerError("the tokenizer has neither a BOS nor an EOS token to stand for an empty context")
    return int(token)


def _adds_bos(llm) -> bool:
    """HFLM's add_bos_token default: off, except Gemma models (which the harness gives a BOS)."""
    return "gemma" in str(getattr(getattr(llm.model, "config", None), "model_type", ""))


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def _mean_stderr(values: Sequence[float]) -> float | None:
    """Sample standard deviation / sqrt(n), as the harness's `mean_stderr`; None for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first of equals, as numpy's argmax


def _choice_text(continuation: str) -> str:
    from tinkerlm.evaluate.tasks import TARGET_DELIMITER

    return continuation.removeprefix(TARGET_DELIMITER)


def score_item(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict:
    """acc, acc_norm (ll / characters) and acc_bytes (ll / UTF-8 bytes) of one question from its choices'
    log-likelihoods; `choices` are the continuations (their leading target delimiter is not counted)."""
    texts = [_choice_text(c) for c in choices]
    pred = _argmax(lls)
    pred_norm = _argmax([ll / max(len(t), 1) for ll, t in zip(lls, texts)])
    pred_bytes = _argmax([ll / max(len(t.encode("utf-8")), 1) for ll, t in zip(lls, texts)])
    return {
        "gold": gold,
        "pred": pred,
        "pred_norm": pred_norm,
        "acc": int(pred == gold),
        "acc_norm": int(pred_norm == gold),
        "acc_bytes": int(pred_bytes == gold),
        "ll": [float(x) for x in lls],
    }


def _accuracy_metrics(items: list[dict]) -> dict:
    out = {}
    for key in ("acc", "acc_norm", "acc_bytes"):
        values = [it[key] for it in items]
        out[key] = sum(values) / len(values)
        out[f"{key}_stderr"] = _mean_stderr(values)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Task kinds


def _bar(total: int, desc: str, unit: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not progress, leave=False)


def chat_request(llm, context: str, continuation: str, system: str = "") -> tuple[str, str]:
    """The (context, continuation) strings of a request under the model's chat template: the task's description
    (MMLU's) as a system message, the rest of the context (few-shot examples and question) as one user message,
    the generation prompt added; the continuation without its target delimiter. As lm-evaluation-harness's
    --apply_chat_template without --fewshot_as_multiturn."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": context}]
    rendered = llm.apply_chat_template(messages, add_generation_prompt=True)
    return rendered, _choice_text(continuation)


def _description(task, item) -> str:
    """The task description before `item`'s few-shot examples (MMLU's "The following are ..."), else ""."""
    description = getattr(task, "_fewshot", {}).get(item.group, ("", []))[0]
    return description if isinstance(description, str) else ""


def _multiple_choice(llm, task, *, chat: bool, batch_size: int, progress: bool) -> tuple[dict, list[dict], str]:
    from tinkerlm.evaluate.scoring import loglikelihoods

    add_bos = _adds_bos(llm)
    rendered: dict[str, str] = {}
    requests, spans = [], []
    for item in task.items:
        start = len(requests)
        system = _description(task, item) if chat else ""
        for context, continuation in task.requests(item):
            if chat:
                if context not in rendered:
                    if system and context.startswith(system):
                        rendered[context] = chat_request(llm, context[len(system) :], "", system)[0]
                    else:
                        rendered[context] = chat_request(llm, context, "")[0]
                context, continuation = rendered[context], _choice_text(continuation)
            requests.append(encode_pair(llm.tokenizer, context, continuation, add_bos=add_bos))
        spans.append((start, len(requests)))
    # Scored a few hundred questions a call: a progress bar with an ETA, and each call still sorts and batches
    # thousands of requests (the choices of a question always share one call, so their context is prefilled once).
    chunk = max(256, 8 * batch_size)
    scores: list[tuple[float, bool]] = []
    with _bar(len(task.items), task.name, "q", progress) as bar:
        for s in range(0, len(spans), chunk):
            part = spans[s : s + chunk]
            scores += loglikelihoods(llm.model, requests[part[0][0] : part[-1][1]], batch_size=batch_size)
            bar.update(len(part))
    items = []
    for item, (a, b) in zip(task.items, spans):
        items.append({"id": item.id, **score_item([ll for ll, _ in scores[a:b]], item.choices, item.gold)})
    return _accuracy_metrics(items), items, getattr(task, "main", "acc")


def _window_spans(max_context: int, n_tokens: int, limit: int | None) -> list[tuple[int, int, int]]:
    """The windows of `perplexity.perplexity`'s defaults (context 512 capped at the model's, stride half of it)."""
    from tinkerlm.evaluate.perplexity import windows

    context = min(PPL_CONTEXT, max_context)
    spans = list(windows(n_tokens, context, max(1, context // 2)))
    return spans[:limit] if limit is not None else spans


def _perplexity(llm, text: str, name: str, limit: int | None, progress: bool) -> tuple[dict, list[dict], str]:
    """Windows of `perplexity.perplexity` (same ids, same windows, same forward passes), one item each."""
    from tinkerlm.evaluate.perplexity import token_nll

    ids = list(llm.tokenizer.encode(text))
    if len(ids) < 2:
        raise TinkerError(f"{name}: the text has fewer than 2 tokens (give a longer text)")
    spans = _window_spans(llm.model.max_context, len(ids), limit)
    items, total, count = [], 0.0, 0
    with _bar(len(spans), name, "window", progress) as bar:
        for k, (begin, end, first) in enumerate(spans):
            window = ids[begin:end]  # one window: token_nll scores all of it in one forward pass
            nll = token_nll(llm.model, window, context=len(window), stride=max(1, len(window) - 1))
            part = nll[first - 1 - begin :].double()  # targets first..end-1
            items.append({"id": f"{name}:{k}", "nll": float(part.sum()), "tokens": int(part.numel())})
            total, count = total + items[-1]["nll"], count + items[-1]["tokens"]
            bar.update(1)
    if limit is None or len(spans) == len(_window_spans(llm.model.max_context, len(ids), None)):
        n_bytes = len(text.encode("utf-8"))
    else:  # the text the scored windows cover
        n_bytes = len(llm.tokenizer.decode(ids[: spans[-1][1]], skip_special_tokens=True).encode("utf-8"))
    metrics = {
        "ppl": math.exp(total / count),
        "nll": total / count,
        "bits_per_byte": total / math.log(2) / max(n_bytes, 1),
        "tokens": count,
        "bytes": n_bytes,
    }
    return metrics, items, "ppl"


def _kl(llm, reference, text: str, limit: int | None, progress: bool) -> tuple[dict, list[dict], str]:
    """KL(P || Q) per scored token, P the reference's next-token distribution and Q the model's, in the
    perplexity windows (`perplexity.divergence`, which `tinkerlm.export.verify.compare` uses too); one item per window."""
    import torch

    from tinkerlm.evaluate.perplexity import divergence

    ids = list(llm.tokenizer.encode(text))
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    spans = _window_spans(min(llm.model.max_context, reference.model.max_context), len(ids), limit)
    items, kls, agree, nll_p, nll_q = [], [], 0, 0.0, 0.0
    with torch.inference_mode(), _bar(len(spans), "kl", "window", progress) as bar:
        for k, (begin, end, first) in enumerate(spans):
            x = ids_t[None, begin:end]
            rows = slice(first - 1 - begin, end - 1 - begin)  # logits[i] predicts ids[begin + i + 1]
            kl, p_nll, q_nll, agrees = divergence(reference.model, llm.model, x, rows, ids_t[first:end, None])
            nll_p += float(p_nll.sum())
            nll_q += float(q_nll.sum())
            agree += int(agrees.sum())
            kls.append(kl)
            items.append({"id": f"kl:{k}", "kl": float(kl.mean()), "tokens": int(kl.numel())})
            bar.update(1)
    every = torch.cat(kls)
    n = int(every.numel())
    metrics = {
        "kl_mean": float(every.mean()),
        "kl_p99": float(torch.quantile(every, 0.99)),
        "kl_max": float(every.max()),
        "top1": agree / n,
        "ppl_reference": math.exp(nll_p / n),
        "ppl": math.exp(nll_q / n),
        "tokens": n,
    }
    return metrics, items, "kl_mean"


# ---------------------------------------------------------------------------------------------------------------
# Which task, and its identity for reuse


class _Spec:
    """One requested task: its kind, name, where its data comes from and a digest of that data."""

    def __init__(self, name: str, kind: str, label: str, data: str, task=None, text: str | None = None):
        self.name, self.kind, self.label, self.data, self.task, self.text = name, kind, label, data, task, text


def _sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _spec(name: str, *, limit, shots, seed) -> _Spec:
    import tinkerlm.evaluate.tasks as tasks_mod
    from tinkerlm.evaluate.perplexity import shipped_text

    if name in SPECIAL_TASKS:
        text = shipped_text()
        return _Spec(name, name, name, f"shipped:{_sha256_bytes(text.encode())}", text=text)
    if name.endswith(".txt"):
        path = Path(name)
        if not path.is_file():
            raise TinkerError(f"{name}: no such text file (a perplexity task reads a UTF-8 .txt file)")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TinkerError(f"{name}: not UTF-8 text (byte {e.start}); save it as UTF-8")
        return _Spec(name, "perplexity", path.stem, f"file:{_sha256_bytes(raw)}", text=text)
    try:
        task = tasks_mod.load_task(name, limit=limit, shots=shots, seed=seed)
    except TinkerError as e:
        if not str(e).startswith("unknown task"):
            raise
        close = difflib.get_close_matches(name, SPECIAL_TASKS, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise TinkerError(f"{e}; also perplexity, kl, or a .txt file (perplexity){hint}") from None
    kind = getattr(task, "kind", "multiple_choice")
    if not (name in tasks_mod._FAMILIES or name in tasks_mod._TASKS):  # a user file: its content is its version
        data = f"file:{_sha256_bytes(Path(name).read_bytes())}"
    else:
        data = f"{tasks_mod.PACKAGE} {tasks_mod.package_version()}"
    return _Spec(name, kind, task.name, data, task=task)


def _model_identity(manifest) -> str | None:
    """A store model's digest, with its parents' for adapters (whose base is part of what is scored)."""
    if manifest is None:
        return None
    from tinkerlm import store

    own = store.digest(manifest)
    if manifest.format != "lora":
        return own
    parents = ",".join(sorted(str(p.get("sha256")) for p in manifest.parents))
    return _sha256_bytes(f"{own}+{parents}".encode())


def _reference_identity(reference: str | None) -> str | None:
    """The reference model's store digest (None for a path or a model not in the store: no reuse)."""
    if reference is None:
        return None
    from tinkerlm import store

    try:
        m = store.find(reference) if not Path(reference).exists() else None
    except TinkerError:
        return None
    return _model_identity(m)


def _records_path(model_sha: str, label: str, key: str) -> Path:
    from tinkerlm import store

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label)[:80] or "task"
    return store.home() / "evals" / model_sha / f"{safe}-{key}.json"


def _request_key(spec: _Spec, settings: dict, quant: str, reference_id: str | None) -> str:
    scored_as_questions = spec.kind in ("multiple_choice", "generate")
    ident = {
        "task": spec.label,
        "kind": spec.kind,
        "data": spec.data,
        "data_version": DATA_VERSION,
        "limit": settings["limit"],
        "shots": settings["shots"] if scored_as_questions else 0,
        "chat": settings["chat"] if scored_as_questions else False,
        "seed": settings["seed"] if scored_as_questions else None,
        "quant": quant,
        "reference": reference_id if spec.kind == "kl" else None,
    }
    return _sha256_bytes(json.dumps(ident, sort_keys=True).encode())[:16]


def _read_records(path: Path, key: str) -> dict | None:
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("format") != FORMAT or stored.get("key") != key:
        return None
    entry = stored.get("task")
    return entry if isinstance(entry, dict) and isinstance(entry.get("items"), list) else None


def _write_records(path: Path, key: str, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"format": FORMAT, "key": key, "task": entry})


# ---------------------------------------------------------------------------------------------------------------
# The runner


def _load(model, quant: str, threads: int | None = None):
    if isinstance(model, (str, Path)):
        import tinkerlm

        return tinkerlm.load(str(model), quant=quant, threads=threads)
    if not hasattr(model, "model") or not hasattr(model, "tokenizer"):
        raise TinkerError(f"model: expected a store name, a path or a loaded LLM, got {type(model).__name__}")
    return model


def _check_scores(llm) -> None:
    model = llm.model
    if getattr(model, "lm_head", None) is None or not hasattr(model, "new_cache"):
        raise TinkerError(
            f"{llm.name}: {type(model).__name__} has no language-model head and cannot score text "
            "(evaluate a causal language model)"
        )


def _task_list(tasks) -> list[str]:
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = [t for t in names if t]
    if not names:
        raise TinkerError("tasks: none given (e.g. --tasks arc_easy,hellaswag)")
    return list(dict.fromkeys(names))


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _run_task(llm, spec: _Spec, *, settings: dict, reference, progress: bool) -> dict:
    """Score one task from scratch: its entry in the results' "tasks"."""
    t0 = time.perf_counter()
    base = {"kind": spec.kind}
    if spec.kind == "multiple_choice":
        task = spec.task
        metrics, items, main = _multiple_choice(
            llm, task, chat=settings["chat"], batch_size=settings["batch_size"], progress=progress
        )
        base.update(source=task.source, licence=task.licence, split=task.split, shots=task.shots)
    elif spec.kind == "generate":
        from tinkerlm.evaluate.generation import score_generation

        task = spec.task
        with _bar(len(task.items), task.name, "q", progress) as bar:
            tick = (lambda done, total: bar.update(done - bar.n)) if progress else False
            metrics, items, main = score_generation(llm, task, batch_size=settings["batch_size"], progress=tick)
        base.update(
            source=getattr(task, "source", spec.name),
            licence=getattr(task, "licence", "user's"),
            split=getattr(task, "split", "file"),
            shots=getattr(task, "shots", 0),
        )
    elif spec.kind == "perplexity":
        metrics, items, main = _perplexity(llm, spec.text, spec.label, settings["limit"], progress)
        base.update(**_text_source(spec), shots=0)
    elif spec.kind == "kl":
        metrics, items, main = _kl(llm, reference, spec.text, settings["limit"], progress)
        base.update(**_text_source(spec), shots=0, reference=reference.name)
    else:
        raise TinkerError(f"{spec.name}: unknown task kind {spec.kind!r}")
    higher = spec.kind in ("multiple_choice", "generate")
    return {
        **base,
        "n": len(items),
        "seconds": round(time.perf_counter() - t0, 3),
        "main": main,
        "higher_is_better": higher,
        "metrics": metrics,
        "items": items,
    }


def _text_source(spec: _Spec) -> dict:
    if spec.name in SPECIAL_TASKS:
        from tinkerlm.evaluate.perplexity import DEFAULT_TEXT

        where = f"tinkerlm/evaluate/data/{DEFAULT_TEXT.name} (Alice's Adventures in Wonderland, ch. I-II)"
        return {"source": where, "licence": "public domain", "split": "text"}
    return {"source": f"{spec.name} (user text)", "licence": "user's", "split": "text"}


def evaluate(
    model,
    tasks: str | Sequence[str],
    *,
    limit: int | None = None,
    shots: int = 0,
    chat: bool = False,
    batch_size: int = 16,
    seed: int = 1234,
    quant: str | None = None,
    reference=None,
    progress: bool = False,
    store: bool = True,
    reuse: bool = True,
    threads: int | None = None,
) -> dict:
    """Evaluate one model on `tasks` and return the results (format `tinkerlm-eval/1`).

    Args:
        model: a store name, a .gguf file, a Hugging Face or adapter directory (loaded with `tinkerlm.load`), or an
            already loaded `LLM`.
        tasks: names (`arc_easy`, `mmlu`, `perplexity`, `kl`), `.jsonl` task files or `.txt` texts (perplexity),
            as a list or one comma-separated string.
        limit: the first `limit` items of each task (for `mmlu`, of each subject; for perplexity and kl, windows).
        shots: few-shot examples before each question (see `tasks.load_task`).
        chat: render the prompts with the model's chat template (see the module docstring).
        batch_size: requests scored per forward pass (the scores do not depend on it beyond float rounding).
        seed: seeds the few-shot draw; the same seed and limit give the same items and prompts.
        quant: weight format to load `model` with (default "native"); for an `LLM`, the one it was loaded with
            (default "native", `tinkerlm.load`'s): it is part of the identity under which records are reused.
        reference: the model `kl` compares against (a store name or path, loaded with the same `quant`).
        progress: progress bars with an ETA on stderr.
        store: for store models, keep per-item records under ROOT/evals/ and the summary in the manifest.
        reuse: read stored per-item records of an identical request instead of scoring again.
        threads: CPU threads for models loaded here (default: the physical cores); not part of the records'
            identity, as the scores do not depend on it beyond float rounding.
    Returns:
        {"format", "model": {"ref", "sha256", "quant"}, "created", "tinkerlm", "seconds", "settings", "tasks":
        {name: {"kind", "source", "licence", "split", "shots", "n", "seconds", "main", "higher_is_better",
        "metrics", "items"}}}: fractions in 0..1; items in task order with an "id" that pairs them across runs.
    Raises:
        TinkerError: unknown task (close names suggested), a bad task file line (file:line), kl without a
            reference, a model that cannot score, bad limit/shots/batch size.
    """
    from tinkerlm import __version__

    t0 = time.perf_counter()
    names = _task_list(tasks)
    quant = quant or "native"
    if quant not in QUANTS:
        raise TinkerError(f"quant: {quant!r} is not one of {', '.join(QUANTS)}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise TinkerError(f"limit must be a positive integer (got {limit!r})")
    if not isinstance(shots, int) or shots < 0:
        raise TinkerError(f"shots must be >= 0 (got {shots!r})")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise TinkerError(f"batch_size must be a positive integer (got {batch_size!r})")
    if "kl" in names and reference is None:
        raise TinkerError("kl: the kl task needs a reference model to compare against (--reference NAME)")
    specs = [_spec(n, limit=limit, shots=shots, seed=seed) for n in names]  # bad input fails before loading
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        dup = next(x for x in labels if labels.count(x) > 1)
        raise TinkerError(f"tasks: two tasks are named {dup!r} (rename one of the files)")

    llm = _load(model, quant, threads)
    _check_scores(llm)
    manifest = getattr(llm, "manifest", None)
    model_sha = _model_identity(manifest)
    settings = {"limit": limit, "shots": shots, "chat": chat, "batch_size": batch_size, "seed": seed}
    reference_id = _reference_identity(reference if isinstance(reference, str) else None)
    ref_llm = reference if reference is not None and not isinstance(reference, (str, Path)) else None

    results = {
        "format": FORMAT,
        "model": {"ref": llm.name, "sha256": model_sha, "quant": quant},
        "created": _now(),
        "tinkerlm": __version__,
        "seconds": 0.0,
        "settings": settings,
        "tasks": {},
    }
    for spec in specs:
        key = _request_key(spec, settings, quant, reference_id)
        path = _records_path(model_sha, spec.label, key) if model_sha else None
        reusable = path is not None and (spec.kind != "kl" or reference_id is not None)
        entry = _read_records(path, key) if reuse and reusable else None
        if entry is not None:
            entry = {**entry, "reused": True}
        else:
            if spec.kind == "kl" and ref_llm is None:
                ref_llm = _load(reference, quant, threads)
                _check_scores(ref_llm)
            entry = _run_task(llm, spec, settings=settings, reference=ref_llm, progress=progress)
            if store and reusable:
                _write_records(path, key, entry)
        results["tasks"][spec.label] = entry
    results["seconds"] = round(time.perf_counter() - t0, 3)
    if store and manifest is not None:
        _store_summary(manifest, model_sha, results)
    return results


def _store_summary(manifest, model_sha: str, results: dict) -> None:
    from tinkerlm import store

    s = results["settings"]
    summary = {
        label: {
            "metrics": e["metrics"],
            "main": e["main"],
            "higher_is_better": e["higher_is_better"],
            "n": e["n"],
            "shots": e.get("shots", 0),
            "licence": e.get("licence"),  # the task data's, for `tinkerlm openness` (Evaluation data)
            "limit": s["limit"],
            "chat": s["chat"],
            "seed": s["seed"],
            "quant": results["model"]["quant"],
            "created": results["created"],
            "tinkerlm": results["tinkerlm"],
        }
        for label, e in results["tasks"].items()
    }
    # A score on the whole task is not replaced by a later --limit run's (the records of both are kept).
    current = store.find(manifest.ref)
    stored = (current.evaluations if current is not None else None) or {}
    summary = {
        k: v
        for k, v in summary.items()
        if not (v["limit"] is not None and isinstance(stored.get(k), dict) and stored[k].get("limit") is None)
    }
    if not summary:
        return
    try:
        store.update(manifest.ref, expect_sha256=store.digest(manifest), evaluations=summary)
    except TinkerError as e:  # removed or replaced meanwhile: the results are still returned
        import logging

        logging.getLogger(__name__).warning("%s: scores not stored (%s)", manifest.ref, e)


# ---------------------------------------------------------------------------------------------------------------
# Text


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def format_table(results: dict) -> str:
    """The results as an aligned table: task, n, metric, value ± stderr, acc_norm (fractions, as in the JSON)."""
    header = ("TASK", "N", "METRIC", "VALUE", "± STDERR", "ACC_NORM")
    rows = [header]
    for label, e in results["tasks"].items():
        m = e["metrics"]
        main = e["main"]
        stderr = m.get(f"{main}_stderr")
        norm = m.get("acc_norm")
        if norm is not None and main != "acc_norm":
            norm_text = _fmt(norm) + (f" ± {_fmt(m['acc_norm_stderr'])}" if m.get("acc_norm_stderr") else "")
        else:
            norm_text = ""
        rows.append(
            (
                label + (" (stored)" if e.get("reused") else ""),
                str(e["n"]),
                main + ("" if e["higher_is_better"] else " (lower is better)"),
                _fmt(m.get(main)),
                f"± {_fmt(stderr)}" if stderr is not None else "",
                norm_text,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(a) -> None:
    """`tinkerlm eval` (see cli.py for the flags)."""
    results = evaluate(
        a.model,
        a.tasks,
        limit=a.limit,
        shots=a.shots,
        chat=a.chat,
        batch_size=a.batch_size,
        seed=a.seed,
        quant=a.quant,
        reference=a.reference,
        progress=True,
        store=getattr(a, "store", True),
        reuse=getattr(a, "store", True),
        threads=getattr(a, "threads", None),
    )
    if a.out:
        out = Path(a.out)
        if out.parent and not out.parent.is_dir():
            raise TinkerError(f"--out: {out.parent} is not a directory")
        write_json(out, results)
    if a.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_table(results))
        if a.out:
            print(f"wrote {a.out}", file=sys.stderr)
