"""`tinkerlm export` and `tinkerlm quantize`: a stored model written as a GGUF file of any type or a Hugging Face
directory, or quantized into a new store model, and every written model verified against its source.

    tinkerlm export smollm2 --to gguf --type q4_k_m --out smollm2-q4_k_m.gguf [--ollama] [--report]
    tinkerlm export my-finetune --to hf --out ./my-finetune-hf
    tinkerlm quantize my-finetune --type q4_k_m --out my-finetune-q4 [--calibration text.txt | --imatrix imatrix.gguf]

Every store model exports: GGUF and HF models, LoRA adapters (folded into their base on the fly), fused and merged
models. Verification (on by default) reads the written file back through tinkerlm's own loader and compares it
with the source on a fixed text (the shipped evaluation text, or --eval-text): KL divergence (mean, 99th
percentile), top-1 agreement and both perplexities. A tensor that should be exact (F32, or copied blocks) and is
not, or a tokenizer that encodes the text differently after the round trip, is an error: the file is not put in
place (it is written to a temp name beside the target and renamed only once verified) and nothing enters the store.

A quantization or export of a model whose licence forbids derivatives is allowed (a technical modification, with a
warning); one of a model whose own licence is a conflicting conjunction (a merge made with
--accept-licence-conflict) is refused unless `accept_licence_conflict` is set (`tinkerlm.openness.remix`). The
obligations the written model inherits are printed, and a quantization stores them in its manifest.

Modules: source.py (what is read), types.py (llama.cpp's per-tensor type rules), gguf.py and hf.py (the writers),
verify.py (the comparison), imatrix.py (importance matrices), ollama.py (Modelfiles), card.py (model cards).
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from pathlib import Path

from tinkerlm.errors import TinkerError
from tinkerlm.fileio import write_atomic
from tinkerlm.store.display import format_verification

VERIFY_TOKENS = 1024  # tokens of the evaluation text compared (two windows of 512 on SmolLM2: seconds)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _imatrix(source, imatrix: str | None, calibration: str | None, progress: bool):
    """The importance matrix to weight the rounding by: read from a file, or computed from calibration text."""
    from tinkerlm.export import imatrix as im

    if imatrix and calibration:
        raise TinkerError("give --imatrix or --calibration, not both")
    if imatrix:
        return im.load(Path(imatrix)), {"imatrix": str(Path(imatrix).resolve())}
    if calibration:
        path = Path(calibration)
        if not path.is_file():
            raise TinkerError(f"--calibration: {path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise TinkerError(f"--calibration: {path} is not UTF-8 text") from None
        ids = source.tokenizer.encode(text)
        if len(ids) < 2:
            raise TinkerError(f"--calibration: {path} has fewer than 2 tokens; give a longer text")
        from tinkerlm import store

        _log(f"computing an importance matrix from {path} ({len(ids)} tokens)")
        return im.compute(source.model(), ids, progress=progress), {
            "calibration": str(path.resolve()),
            "calibration_sha256": store.sha256_file(path),
            "calibration_tokens": len(ids),
        }
    return None, {}


def _eval_text(eval_text: str | None) -> str:
    """The verification text: the --eval-text file, else the shipped evaluation text."""
    from tinkerlm.evaluate.perplexity import shipped_text

    if not eval_text:
        return shipped_text()
    path = Path(eval_text)
    if not path.is_file():
        raise TinkerError(f"--eval-text: {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TinkerError(f"--eval-text: {path} is not UTF-8 text") from None


def _verify(source, written: Path, exact: list[str], eval_text: str | None) -> dict:
    """Load the written model (weights dequantized exactly) and compare it with the source: the tensors named in
    `exact` must equal the source's bit for bit, then the figures of `_compare`."""
    import torch

    from tinkerlm.loading import load_checkpoint

    model, tokenizer, _ = load_checkpoint(written, torch.float32, "fp32")
    mine = model.state_dict()
    for name in exact:
        want = source.tensor(name)
        if source.spec.value_shift(name):  # stored as w + 1 (Gemma's norms): exact but for the rounding of the 1
            same = torch.allclose(mine[name], want, rtol=2**-22, atol=2**-23)
        else:
            same = torch.equal(mine[name], want)
        if not same:
            raise TinkerError(
                f"{written}: tensor {name} does not read back identically to the source; it was not kept (please "
                "report this bug)"
            )
    return _compare(source, model, tokenizer, eval_text, written)


def _compare(source, model, tokenizer, eval_text: str | None, written: Path) -> dict:
    """Verification figures of a loaded written model against the source; its tokenizer must encode the text alike."""
    from tinkerlm.export import verify as v

    text = _eval_text(eval_text)
    ids = source.tokenizer.encode(text)
    if tokenizer.encode(text) != ids:
        raise TinkerError(
            f"{written}: the written tokenizer encodes the evaluation text differently from the source's; it was "
            "not kept (please report this bug)"
        )
    if len(ids) < 2:
        raise TinkerError(f"--eval-text: {eval_text} has fewer than 2 tokens; give a longer text")
    result = v.compare(source.model(), model, ids[:VERIFY_TOKENS])
    result["text"] = Path(eval_text).name if eval_text else "shipped evaluation text"
    return result


def _licence_terms(name: str, kind: str, out: str, accept_licence_conflict: bool):
    """The licence terms (`tinkerlm.openness.remix.Terms`) of a quantization or export of `name`, read from its
    manifest or its own metadata before the model is loaded; refuses a licence conflict.

    Raises:
        TinkerError: `name` is not in the store and not a path, or the licence conflicts without
            `accept_licence_conflict`.
    """
    from tinkerlm import store
    from tinkerlm.api import resolve
    from tinkerlm.openness import remix

    path, manifest = resolve(name, pull=False)
    licence = manifest.license if manifest is not None else store.describe(path).get("license")
    return remix.check([licence], kind=kind, name=out, accept_licence_conflict=accept_licence_conflict)


def _tmp_beside(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")


def export(
    name: str,
    *,
    to: str = "gguf",
    type: str | None = None,
    out: str,
    dtype: str = "auto",
    imatrix: str | None = None,
    calibration: str | None = None,
    verify: bool = True,
    eval_text: str | None = None,
    report: bool = False,
    ollama: bool = False,
    force: bool = False,
    progress: bool = True,
    accept_licence_conflict: bool = False,
) -> dict:
    """Write the model `name` (store name, GGUF file or HF directory) as a GGUF file or HF directory `out`.

    Args:
        to: "gguf" or "hf".
        type: the GGUF file type (f32 f16 bf16 q8_0 q6_k q5_k_m q5_k_s q5_0 q5_1 q4_k_m q4_k_s q4_0 q4_1 q3_k_m q2_k);
            default f16. Not for HF exports (their weights are floats: `dtype`).
        dtype: HF export: auto (each tensor's stored dtype; float32 for GGUF sources), float32, bfloat16, float16.
        imatrix / calibration: an importance matrix file (ours or llama.cpp's), or text to compute one from.
        verify: read the written model back and compare it with the source (False: skip).
        eval_text: the text the verification runs on (default: the shipped evaluation text).
        report: print each tensor's type, bits per weight and relative error.
        ollama: write an Ollama Modelfile beside the GGUF.
        force: replace an existing `out`.
        accept_licence_conflict: export a model whose licence is a conflicting conjunction anyway.

    Returns:
        {"out", "verification" (or None), "tensors" (the per-tensor report rows), "obligations" (what sharing the
        written model obliges), "licence_conflicts" (those accepted)}.

    Raises:
        TinkerError: an unknown type or target, an existing or unwritable output, a model the writer does not
            know, a licence conflict without `accept_licence_conflict`, or a written file that fails verification
            (nothing is left at `out`).
    """
    from tinkerlm.export import types as types_mod
    from tinkerlm.export.source import check_writable, open_source

    if to not in ("gguf", "hf"):
        raise TinkerError(f"--to: {to!r} is not one of gguf, hf")
    if to == "hf" and type is not None:
        raise TinkerError(f"--type {type}: HF exports hold float weights, not GGUF types (use --dtype, or --to gguf)")
    ftype = types_mod.file_type(type or "f16") if to == "gguf" else None
    if to == "hf" and (imatrix or calibration or ollama):
        raise TinkerError("--imatrix, --calibration and --ollama are for --to gguf")
    if to == "gguf" and dtype != "auto":
        raise TinkerError("--dtype is for --to hf (a GGUF's types are chosen by --type)")
    out_path = Path(out).expanduser()
    if to == "gguf" and out_path.suffix.lower() != ".gguf":
        raise TinkerError(f"--out: {out_path} should end in .gguf")
    check_writable(out_path, force)
    if verify:
        _eval_text(eval_text)  # a missing --eval-text fails before anything is written
    if ollama:
        check_writable(out_path.with_name("Modelfile"), force)
    stem = out_path.name.removesuffix(out_path.suffix) if to == "gguf" else out_path.name
    terms = _licence_terms(name, "export", stem, accept_licence_conflict)
    source = open_source(name)
    if ollama:  # before writing anything: a template we cannot translate fails fast
        from tinkerlm.export.ollama import modelfile

        text = modelfile(out_path.name, getattr(source.tokenizer, "chat_template", None), source.tokenizer)
    tmp = _tmp_beside(out_path)
    try:
        if to == "gguf":
            result = _export_gguf(
                source, tmp, out_path, ftype, imatrix, calibration, verify, eval_text, report, progress
            )
        else:
            result = _export_hf(source, tmp, dtype, verify, eval_text, progress)
        if out_path.is_dir() and force:
            shutil.rmtree(out_path)
        os.replace(tmp, out_path)
        if ollama:
            mf = write_atomic(out_path.with_name("Modelfile"), text)
            _log(f"wrote {mf} (ollama create NAME -f {mf})")
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    result["out"] = str(out_path)
    result["obligations"], result["licence_conflicts"] = terms.obligations, terms.conflicts
    _log(f"wrote {out_path}")
    from tinkerlm.openness import remix

    remix.announce(str(out_path), terms, assess=False)  # not a store model: nothing to assess
    return result


def _exact(source, reports) -> list[str]:
    """The tensors a GGUF write should have kept exactly (F32, or blocks copied), by HF name."""
    return [name for name, rep in zip(source.names, reports) if rep.lossless]


def _export_gguf(source, tmp, out_path, ftype, imatrix, calibration, verify, eval_text, report, progress) -> dict:
    from tinkerlm.export import gguf as gguf_mod

    im, _ = _imatrix(source, imatrix, calibration, progress)
    relation = "converted" if ftype.default in ("F32", "F16", "BF16") else "quantized"
    reports = gguf_mod.write(source, tmp, ftype, imatrix=im, relation=relation, report=report, progress=progress)
    if report:
        _log(gguf_mod.format_report(reports))
    verification = None
    if verify:
        verification = _verify(source, tmp, _exact(source, reports), eval_text)
        _log(f"verified {out_path.name} against {source.ref}: {format_verification(verification)}")
    return {"verification": verification, "tensors": [r.__dict__ for r in reports]}


def _export_hf(source, tmp: Path, dtype: str, verify: bool, eval_text: str | None, progress: bool) -> dict:
    from tinkerlm.export import card as card_mod
    from tinkerlm.export import hf as hf_mod

    chosen = hf_mod.dtypes(source, dtype)
    exact = hf_mod.lossless(source, chosen)
    tmp.mkdir()
    hf_mod.write(source, tmp, dtype)
    verification = None
    if verify:
        verification = _verify(source, tmp, source.names if exact else [], eval_text)
        _log(f"verified against {source.ref}: {format_verification(verification)}")
    written_dtypes = ", ".join(sorted({str(t).removeprefix("torch.") for t in chosen.values()}))
    m = source.manifest
    files = sorted(p.name for p in tmp.iterdir())
    description = f"{source.ref} exported by tinkerlm as a Hugging Face model ({written_dtypes})."
    if m is not None:  # a stored model: its full card (lineage, openness, obligations), for the copy written
        text = card_mod.store_card(
            m.ref, files=files, verification=verification, description=description, evaluations=exact, copy_of=not exact
        )
        (tmp / "README.md").write_text(text, encoding="utf-8")
        return {"verification": verification, "tensors": []}
    lineage = [{"name": source.ref, "sha256": source.digest, "relation": "source", "license": source.license}]
    lineage += list(m.parents) if m is not None else []
    card = card_mod.model_card(
        name=source.ref,
        license=source.license,
        base_models=[source.ref],
        relation=None if exact else "quantized",
        description=description,
        lineage=lineage,
        verification=verification,
        files=files,
        # The source's scores hold for a lossless copy only (a dtype change is another model: evaluate it).
        evaluations=m.evaluations if m is not None and exact else None,
    )
    (tmp / "README.md").write_text(card, encoding="utf-8")
    return {"verification": verification, "tensors": []}


def quantize(
    name: str,
    *,
    type: str,
    out: str,
    imatrix: str | None = None,
    calibration: str | None = None,
    verify: bool = True,
    eval_text: str | None = None,
    report: bool = False,
    force: bool = False,
    progress: bool = True,
    accept_licence_conflict: bool = False,
):
    """Quantize the model `name` into a new store model `out` (a GGUF of file type `type`), its parent `name`
    (relation "quantized"), verified against it and the figures kept in its manifest.

    Raises:
        TinkerError: as `export`, or `out` already stored without `force`.
    """
    from tinkerlm import store
    from tinkerlm.export import gguf as gguf_mod
    from tinkerlm.export import types as types_mod
    from tinkerlm.export.source import open_source
    from tinkerlm.openness import remix

    ftype = types_mod.file_type(type)
    store_name, tag = store.parse_name(out)
    if not force and store.find(f"{store_name}:{tag}") is not None:
        raise TinkerError(f"--out: {store_name}:{tag} is already in the store; pick another name or pass --force")
    if verify:
        _eval_text(eval_text)
    terms = _licence_terms(name, "quantize", store_name, accept_licence_conflict)
    source = open_source(name)
    im, im_source = _imatrix(source, imatrix, calibration, progress)
    details: dict = {}  # filled by `fill` with the verification figures, which the manifest then records

    def fill(model_dir: Path) -> None:
        path = model_dir / f"{store_name}-{ftype.name}.gguf"
        reports = gguf_mod.write(
            source, path, ftype, imatrix=im, relation="quantized", report=report, progress=progress
        )
        if report:
            _log(gguf_mod.format_report(reports))
        if verify:
            details.update(_verify(source, path, _exact(source, reports), eval_text))
            _log(f"verified against {source.ref}: {format_verification(details)}")

    parents = (
        [store.parent_entry(source.manifest, "quantized")]
        if source.manifest is not None
        else [{"name": str(source.path), "sha256": source.digest, "relation": "quantized", "license": source.license}]
    )
    m = store.add(
        out,
        fill,
        source={"type": "quantize", "uri": f"quantize:{source.ref}", "file_type": ftype.name, **im_source},
        parents=parents,
        license=source.license,
        force=force,
        verification=details,
        obligations=terms.obligations,
        licence_conflicts=terms.conflicts,
    )
    _log(f"stored {m.ref}: {source.ref} quantized to {ftype.name}")
    remix.announce(m.ref, terms)
    return m


def export_main(a) -> None:
    export(
        a.name, to=a.to, type=getattr(a, "type", None), out=a.out, dtype=a.dtype, imatrix=a.imatrix,
        calibration=a.calibration, verify=getattr(a, "verify", True), eval_text=a.eval_text, report=a.report,
        ollama=a.ollama, force=a.force, accept_licence_conflict=a.accept_licence_conflict,
    )  # fmt: skip


def quantize_main(a) -> None:
    quantize(
        a.name, type=a.type, out=a.out, imatrix=a.imatrix, calibration=a.calibration,
        verify=getattr(a, "verify", True), eval_text=a.eval_text, report=a.report, force=a.force,
        accept_licence_conflict=a.accept_licence_conflict,
    )  # fmt: skip
