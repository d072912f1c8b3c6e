"""An Ollama Modelfile for an exported GGUF: FROM the file, the chat template in Ollama's Go template syntax, and
the stop sequences.

Ollama does not run a model's Jinja chat template; it needs the same prompt format written as a Go `text/template`
over `.System` (the system messages, joined) and `.Messages` (each with `.Role` and `.Content`). There is no general
Jinja -> Go translation, so the template's family is recognised by its turn markers and the family's prompt format
is written out, in the shape of Ollama's own library templates: the system prompt first, each user and assistant
turn, the last assistant turn left open (the model continues it), and the assistant header after a final user turn.

Families: ChatML (`<|im_start|>`: SmolLM2, Qwen, many fine-tunes), Llama 3 (`<|start_header_id|>`) and Gemma
(`<start_of_turn>`; no system role, so the system prompt opens the first user turn, as Gemma 3's template does).
The BOS token is not written: llama.cpp adds it when the GGUF's `tokenizer.ggml.add_bos_token` says so. Default
system prompts a template may carry, and tool calling, are not translated.

References: Ollama docs/modelfile.md and docs/template.md (https://github.com/ollama/ollama).
"""

from __future__ import annotations

from tinkerlm.errors import TinkerError

CHATML = """\
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ if $last }}<|im_start|>assistant
{{ end }}
{{- else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- end }}"""

LLAMA3 = """\
{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- if $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>

{{ .Content }}{{ if not $last }}<|eot_id|>{{ end }}
{{- end }}
{{- end }}"""

GEMMA = """\
{{- $system := .System }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""

# family -> (marker in the Jinja template, Go template, stop sequences)
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "llama3": ("<|start_header_id|>", LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "gemma": ("<start_of_turn>", GEMMA, ("<start_of_turn>", "<end_of_turn>")),
    "chatml": ("<|im_start|>", CHATML, ("<|im_start|>", "<|im_end|>")),
}


def family(chat_template: str | None) -> str | None:
    """The prompt-format family of a Jinja chat template ("chatml", "llama3", "gemma"), or None."""
    if not chat_template:
        return None
    return next((name for name, (marker, _, _) in FAMILIES.items() if marker in chat_template), None)


def modelfile(gguf_name: str, chat_template: str | None, tokenizer=None) -> str:
    """The Modelfile text for the GGUF file `gguf_name` (written beside it) with this Jinja chat template.

    Args:
        gguf_name: the GGUF file's name, relative to the Modelfile (`FROM ./<name>`).
        chat_template: the model's Jinja chat template.
        tokenizer: the model's tokenizer (optional): its end-of-turn tokens join the stop sequences.
    Raises:
        TinkerError: the template's family is not known, or the file name cannot be written in a Modelfile.
    """
    if any(c in gguf_name for c in '\n\r"') or not gguf_name.strip():
        raise TinkerError(f"Modelfile: the file name {gguf_name!r} cannot be written in a FROM line (rename it)")
    fam = family(chat_template)
    if fam is None:
        raise TinkerError("no Ollama template for this chat template; write the Modelfile's TEMPLATE by hand")
    _, template, stops = FAMILIES[fam]
    stops = list(stops)
    for text in _stop_tokens(tokenizer):
        if text not in stops:
            stops.append(text)
    path = gguf_name if gguf_name.startswith(("/", "./", "../")) else f"./{gguf_name}"
    lines = [f"FROM {path}", "", f'TEMPLATE """{template}"""', ""]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def _stop_tokens(tokenizer) -> list[str]:
    """The tokenizer's stop tokens as text, where they are special tokens a Modelfile can quote (`<|endoftext|>`);
    ordinary vocabulary pieces and anything with quotes or line breaks are left to the GGUF's own EOS handling."""
    if tokenizer is None:
        return []
    out = []
    for i in getattr(tokenizer, "stop_token_ids", []):
        text = tokenizer.id_to_token(i)
        if text and text.startswith("<") and text.endswith(">") and len(text) <= 64 and not set(text) & set('"\\\n\r'):
            out.append(text)
    return out
