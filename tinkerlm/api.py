"""The Python API: `load(name_or_path)` returns an `LLM` with `generate`, `stream` and `chat`.

    import tinkerlm
    llm = tinkerlm.load("smollm2")            # a store name (pulled if missing), a .gguf file or an HF directory
    print(llm.chat("Name three primary colours."))
    for piece in llm.stream("Once upon a time", max_tokens=50):
        print(piece, end="", flush=True)

This layer finds models by name (the store) and hands paths to `tinkerlm.loading`, which builds the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

from tinkerlm import chat as chat_mod
from tinkerlm import loading
from tinkerlm.errors import TinkerError
from tinkerlm.generate import SamplingParams, generate, stream_generate

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")


def resolve(name_or_path: str, pull: bool = True):
    """(path, manifest or None) for a file/dir path or a store name; pulls catalogue and hub names when missing."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path, None
    looks_like_path = name_or_path.endswith((".gguf", ".safetensors", ".json")) or name_or_path.startswith(
        ("/", "./", "../", "~")
    )
    if looks_like_path:
        raise TinkerError(f"{name_or_path}: file not found (check the path)")
    from tinkerlm import store

    manifest = store.find(name_or_path)
    if manifest is None:
        if not pull:
            store.get(name_or_path)  # raises, suggesting close names
        manifest = store.pull(name_or_path)
    return store.model_path(manifest), manifest


class LLM:
    """A loaded model and its tokenizer, with the generation API shared by the CLI and server."""

    def __init__(self, model, tokenizer, name: str, manifest=None, generation_config: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.manifest = manifest
        self.generation_config = generation_config or {}

    def __repr__(self) -> str:
        return f"LLM({self.name!r}, {type(self.model).__name__})"

    # -- helpers -------------------------------------------------------------------------------------------------
    def _options(self, opts: dict[str, Any]) -> dict[str, Any]:
        unknown = set(opts) - set(SAMPLING_KEYS) - {"max_tokens", "stop"}
        if unknown:
            raise TinkerError(f"generation option {sorted(unknown)[0]!r} is not known (known: max_tokens, stop, "
                              f"{', '.join(SAMPLING_KEYS)})")
        sampling = SamplingParams(**{k: opts[k] for k in SAMPLING_KEYS if opts.get(k) is not None})
        stop = opts.get("stop") or ()
        return {
            "max_tokens": opts.get("max_tokens") or 256,
            "sampling": sampling,
            "stop": [stop] if isinstance(stop, str) else list(stop),
        }

    def apply_chat_template(self, messages: str | Sequence[dict], add_generation_prompt: bool = True) -> str:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return chat_mod.render(self.tokenizer, messages, add_generation_prompt=add_generation_prompt)

    def _chat_ids(self, messages) -> list[int]:
        # The template writes special tokens itself, so none are added on encoding (as transformers does).
        return self.tokenizer.encode(self.apply_chat_template(messages), add_special_tokens=False)

    # -- generation ----------------------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[str], **opts) -> str | list[str]:
        """Continue raw text. A list of prompts runs as one batch and returns a list."""
        return generate(self.model, self.tokenizer, prompt, **self._options(opts))

    def stream(self, prompt: str, **opts) -> Iterator[str]:
        """Continue raw text, yielding text pieces as they are generated."""
        for chunk in stream_generate(self.model, self.tokenizer, [prompt], **self._options(opts)):
            if chunk.text:
                yield chunk.text

    def chat(self, messages: str | Sequence[dict], **opts) -> str:
        """The assistant's answer to a conversation (a list of {role, content}) or a single user message."""
        return "".join(self.chat_stream(messages, **opts))

    def chat_stream(self, messages: str | Sequence[dict], **opts) -> Iterator[str]:
        ids = self._chat_ids(messages)
        for chunk in stream_generate(self.model, self.tokenizer, [ids], **self._options(opts)):
            if chunk.text:
                yield chunk.text


def resolve_adapter(manifest):
    """(adapter, base path, base manifest or None) of a stored LoRA adapter: the `tinkerlm.formats.peft.Adapter`
    and the base model it was trained on (named in its lineage, else in its adapter config).

    Raises:
        TinkerError: the adapter does not name its base, or the base is gone from the disk or the store.
    """
    from tinkerlm import store
    from tinkerlm.formats.peft import read_adapter

    adapter = read_adapter(store.model_path(manifest))
    ref = next((p["name"] for p in manifest.parents if p.get("relation") == "base"), None) or adapter.base_model
    if not ref:
        raise TinkerError(f"{manifest.ref}: the adapter does not name its base model (base_model_name_or_path)")
    path = Path(ref)
    if path.is_absolute():
        if not path.exists():
            raise TinkerError(f"{manifest.ref}: its base {ref} is gone; restore it to use the adapter")
        return adapter, path, None
    base_m = store.find(ref)
    if base_m is None:
        raise TinkerError(f"{manifest.ref}: its base model {ref} is not in the store; pull it (`tinkerlm pull "
                          f"{ref.partition(':')[0]}`) to use the adapter")
    return adapter, store.model_path(base_m), base_m


def load(name_or_path: str, *, dtype: str = "float32", quant: str = "native", threads: int | None = None,
         pull: bool = True) -> LLM:
    """Load a model by store name (pulling catalogue/hub names if missing), GGUF path or HF directory.

    Args:
        dtype: activation dtype and dtype of unquantized weights.
        quant: weight format: "native" keeps a GGUF's quantization, "int8"/"int4" quantize, "bf16"/"fp32" dequantize.
        threads: CPU threads for torch and the kernels; default the number of physical cores.
    """
    torch_dtype = loading.prepare(dtype, quant, threads)
    path, manifest = resolve(name_or_path, pull=pull)
    if manifest is not None and manifest.format == "lora":
        adapter, base_path, _ = resolve_adapter(manifest)
        model, tokenizer, gen_config = loading.load_adapted(adapter, base_path, torch_dtype, quant, manifest.ref)
    else:
        model, tokenizer, gen_config = loading.load_checkpoint(path, torch_dtype, quant)
    name = manifest.ref if manifest else str(path)
    return LLM(model, tokenizer, name, manifest, gen_config)
