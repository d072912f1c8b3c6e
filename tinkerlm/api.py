"""The Python API: `load(name_or_path)` returns an `LLM` with `generate`, `stream` and `chat`.

    import tinkerlm
    llm = tinkerlm.load("smollm2")            # a store name (pulled if missing), a .gguf file or an HF directory
    print(llm.chat("Name three primary colours."))
    for piece in llm.stream("Once upon a time", max_tokens=50):
        print(piece, end="", flush=True)

This layer finds models by name (the store) and hands paths to `tinkerlm.loading`, which builds the model.

Generation options are `tinkerlm.sampling.SamplingParams`' fields; answers are `Text` strings that also carry the
finish reason and, with `logprobs=k`, each token's log-probability.

Speculative decoding (`tinkerlm.speculative`) is chosen at load time, like the weight format:
`tinkerlm.load("smollm2", prompt_lookup=True)` or `tinkerlm.load("big", draft="small")`; every generation then
speculates, with the same output, and `llm.last_speculation` tells how it went.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from tinkerlm import chat as chat_mod
from tinkerlm import loading
from tinkerlm.errors import TinkerError
from tinkerlm.generate import stream_generate
from tinkerlm.prefix_cache import DEFAULT_MB, PrefixCache
from tinkerlm.sampling import SamplingParams, TokenLogprob, generation_config_defaults, options, token_bytes, token_text
from tinkerlm.speculative import (
    DRAFT_TOKENS,
    LOOKUP_NGRAM,
    Speculative,
    SpeculativeStats,
    check_options,
    speculative,
)


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
    if manifest.format == "tokenizer":  # `tinkerlm tokenizer train` made it: no weights
        raise TinkerError(f"{manifest.ref} is a tokenizer, not a model: it has no weights to run or remix")
    return store.model_path(manifest), manifest


class Text(str):
    """A generated answer or piece: a plain `str`, plus what the engine knows about it.

    Attributes:
        finish_reason: "stop" (stop token, stop string or closed JSON object), "length" (max_tokens or the
            context), or None for a streamed piece that is not the last.
        logprobs: with `logprobs=k`, one `TokenLogprob` per generated token behind this text (`.text`, `.id`,
            `.logprob`, `.top`: the k most likely [(id, logprob)]); else empty.
        tool_calls: with `chat(tools=...)`, the calls in the answer, as OpenAI returns them ({"id", "type":
            "function", "function": {"name", "arguments": JSON text}}); the text is then what is outside them.
    """

    finish_reason: str | None
    logprobs: list[TokenLogprob]
    tool_calls: list[dict]

    def __new__(cls, text: str = "", finish_reason: str | None = None, logprobs: list[TokenLogprob] | None = None):
        self = super().__new__(cls, text)
        self.finish_reason, self.logprobs, self.tool_calls = finish_reason, list(logprobs or []), []
        return self


class LLM:
    """A loaded model and its tokenizer, with the generation API shared by the CLI and server.

    Generation options (keyword arguments of `generate`, `stream`, `chat`, `chat_stream`) are the fields of
    `tinkerlm.sampling.SamplingParams`: max_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
    presence_penalty, frequency_penalty, seed, stop, logprobs, json, json_schema (a dict). An option not given (or
    None) takes the model's generation_config.json value if it sets one (`sampling_defaults`), else the declared
    default.

    `prefix_cache` (a `tinkerlm.prefix_cache.PrefixCache` of `prefix_cache_mb` MiB, 0 disables it) keeps the keys
    and values of recent prompts and answers across calls, so a multi-turn `chat` or prompts sharing a system
    prompt prefill only what is new. It forgets everything when the model's weights change.
    """

    def __init__(
        self,
        model,
        tokenizer,
        name: str,
        manifest=None,
        generation_config: dict | None = None,
        prefix_cache_mb: float = DEFAULT_MB,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.manifest = manifest
        self.generation_config = generation_config or {}
        self.sampling_defaults = generation_config_defaults(self.generation_config, f"{name}: generation_config.json")
        self.prefix_cache = PrefixCache(prefix_cache_mb)
        self.speculative: Speculative | None = None  # set by `load(draft=...)` or `load(prompt_lookup=True)`

    @property
    def last_speculation(self) -> SpeculativeStats | None:
        """Acceptance and tokens per forward of the last generation call (None without speculative decoding)."""
        return self.speculative.stats if self.speculative is not None else None

    def __repr__(self) -> str:
        return f"LLM({self.name!r}, {type(self.model).__name__})"

    # -- helpers -------------------------------------------------------------------------------------------------
    def sampling(self, **opts) -> SamplingParams:
        """The `SamplingParams` for these options over the model's defaults (TinkerError if unknown or invalid)."""
        return options(opts, self.sampling_defaults)

    def apply_chat_template(self, messages: str | Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text the model's chat template makes of `messages` (bounded; see `tinkerlm.chat`)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return chat_mod.render(self.tokenizer, messages, add_generation_prompt=add_generation_prompt)

    def chat_ids(
        self, messages: str | Sequence[dict], parse_special: bool = False, tools: list[dict] | None = None
    ) -> list[int]:
        """The prompt ids for `messages`. Special-token text inside message contents stays plain text unless
        `parse_special=True` (which lets a message write control tokens, e.g. forge a system turn). `tools` becomes
        the template's `tools` variable (see `tinkerlm.toolcalls.plan`)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return chat_mod.prompt_ids(self.tokenizer, messages, parse_special=parse_special, tools=tools)

    def _pieces(self, prompts: list, params: SamplingParams) -> Iterator[tuple[int, Text]]:
        """(row, Text piece) as rows generate; a piece only when it has text, logprobs or a finish reason."""
        table = token_bytes(self.tokenizer, self.model.lm_head.out_features) if params.logprobs is not None else None
        for chunk in stream_generate(
            self.model,
            self.tokenizer,
            prompts,
            sampling=params,
            prefix_cache=self.prefix_cache,
            speculative=self.speculative,
        ):
            for t in chunk.logprobs:
                t.text = token_text(self.tokenizer, table, t.id)[0]
            if chunk.text or chunk.logprobs or chunk.finish_reason:
                yield chunk.index, Text(chunk.text, chunk.finish_reason, chunk.logprobs)

    def _stream(self, prompt, params: SamplingParams) -> Iterator[Text]:
        for _, piece in self._pieces([prompt], params):
            if piece or piece.logprobs:
                yield piece

    @staticmethod
    def _join(pieces: list[Text]) -> Text:
        reason = next((p.finish_reason for p in pieces if p.finish_reason), None)
        return Text("".join(pieces), reason, [t for p in pieces for t in p.logprobs])

    # -- generation ----------------------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[str], **opts) -> Text | list[Text]:
        """Continue raw text. A list of prompts runs as one batch and returns a list."""
        params = self.sampling(**opts)
        single = isinstance(prompt, str)
        batch = [prompt] if single else list(prompt)
        pieces: list[list[Text]] = [[] for _ in batch]
        for i, piece in self._pieces(batch, params):
            pieces[i].append(piece)
        texts = [self._join(p) for p in pieces]
        return texts[0] if single else texts

    def stream(self, prompt: str, **opts) -> Iterator[Text]:
        """Continue raw text, yielding text pieces as they are generated (with `logprobs`, also pieces whose text
        is held back, e.g. half a character)."""
        return self._stream(prompt, self.sampling(**opts))

    def chat(
        self,
        messages: str | Sequence[dict],
        *,
        parse_special: bool = False,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        parallel_tool_calls: bool = True,
        **opts,
    ) -> Text:
        """The assistant's answer to a conversation (a list of {role, content}) or a single user message.

        `parse_special=True` reads special-token text in message contents as control tokens (see `chat_ids`).
        `tools` and `tool_choice` as in OpenAI's API (`tinkerlm.toolcalls`): the answer's `tool_calls` lists the
        calls found (OpenAI's shape, arguments as JSON text), its text is the content outside them, and its
        finish_reason is "tool_calls" when there are any. Messages may hold assistant `tool_calls` and `role:
        "tool"` results (with `tool_call_id`)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        turns = any(isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in messages)
        if tools is None and tool_choice is None and not turns:
            params = self.sampling(**opts)
            return self._join([p for _, p in self._pieces([self.chat_ids(messages, parse_special)], params)])
        from tinkerlm import toolcalls

        plan = toolcalls.plan(self.tokenizer, list(messages), tools, tool_choice, parallel_tool_calls)
        if plan.schema is not None:
            if opts.get("json_schema") is not None or opts.get("json"):
                raise TinkerError("tool_choice: a required call is JSON already; leave out json and json_schema")
            opts["json_schema"] = plan.schema
        params = self.sampling(**opts)
        ids = self.chat_ids(plan.messages, parse_special, tools=plan.tools)
        text = self._join([p for _, p in self._pieces([ids], params)])
        if plan.names is None or (plan.schema is None and params.json):  # no calls, or a JSON answer was asked for
            return text
        content, calls = toolcalls.parse_calls(text, plan.names, plan.parallel)
        reason = "tool_calls" if calls and text.finish_reason == "stop" else text.finish_reason
        out = Text(content or "", reason, text.logprobs)
        out.tool_calls = [toolcalls.openai_call(c) for c in calls]
        return out

    def chat_stream(self, messages: str | Sequence[dict], *, parse_special: bool = False, **opts) -> Iterator[Text]:
        return self._stream(self.chat_ids(messages, parse_special), self.sampling(**opts))


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
        raise TinkerError(
            f"{manifest.ref}: its base model {ref} is not in the store; pull it (`tinkerlm pull "
            f"{ref.partition(':')[0]}`) to use the adapter"
        )
    return adapter, store.model_path(base_m), base_m


def load(
    name_or_path: str,
    *,
    dtype: str = "float32",
    quant: str = "native",
    threads: int | None = None,
    pull: bool = True,
    prefix_cache_mb: float = DEFAULT_MB,
    kv_cache: str = "f32",
    draft: str | LLM | None = None,
    prompt_lookup: bool = False,
    draft_tokens: int = DRAFT_TOKENS,
    lookup_ngram: int = LOOKUP_NGRAM,
) -> LLM:
    """Load a model by store name (pulling catalogue/hub names if missing), GGUF path or HF directory.

    Args:
        dtype: activation dtype and dtype of unquantized weights.
        quant: weight format: "native" keeps a GGUF's quantization, "int8"/"int4" quantize, "bf16"/"fp32" dequantize.
        threads: CPU threads for torch and the kernels; default the number of physical cores.
        prefix_cache_mb: memory for reusing the KV cache of earlier prompts and answers (see `LLM`); 0 disables.
        kv_cache: "f32" keeps keys and values in the activations' dtype; "q8" stores them in 8 bits with one scale
            per token and head (~3.8x less memory for long contexts; logits move by ~2% of their range).
        draft: speculative decoding with this smaller model of the same vocabulary (a name or path, loaded with
            the same dtype and quant, or a loaded `LLM`).
        prompt_lookup: speculative decoding with drafts looked up in the prompt (no second model).
        draft_tokens: tokens drafted per step; lookup_ngram: the longest n-gram prompt lookup matches.

    Raises:
        TinkerError: besides loading errors, a draft of another vocabulary, or both drafters at once.
    """
    check_options(draft is not None, prompt_lookup, draft_tokens, lookup_ngram)  # before loading anything
    torch_dtype = loading.prepare(dtype, quant, threads, kv_cache)
    path, manifest = resolve(name_or_path, pull=pull)
    if manifest is not None and manifest.format == "lora":
        adapter, base_path, _ = resolve_adapter(manifest)
        model, tokenizer, gen_config = loading.load_adapted(adapter, base_path, torch_dtype, quant, manifest.ref)
        own = Path(adapter.path) / "chat_template.jinja"  # an adapter's template replaces its base's
        tokenizer.chat_template_source = str(own) if own.is_file() else chat_mod.template_source(base_path)
    else:
        model, tokenizer, gen_config = loading.load_checkpoint(path, torch_dtype, quant)
        tokenizer.chat_template_source = chat_mod.template_source(path)
    loading.set_kv_cache(model, kv_cache)
    name = manifest.ref if manifest else str(path)
    llm = LLM(model, tokenizer, name, manifest, gen_config, prefix_cache_mb=prefix_cache_mb)
    if isinstance(draft, str):
        draft = load(draft, dtype=dtype, quant=quant, threads=threads, pull=pull, prefix_cache_mb=0, kv_cache=kv_cache)
    llm.speculative = speculative(
        tokenizer,
        name,
        draft=draft.model if draft is not None else None,
        draft_tokenizer=draft.tokenizer if draft is not None else None,
        draft_name=draft.name if draft is not None else "",
        prompt_lookup=prompt_lookup,
        draft_tokens=draft_tokens,
        lookup_ngram=lookup_ngram,
    )
    return llm
