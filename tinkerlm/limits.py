"""Resource bounds for untrusted inputs, in one place.

Model files, chat templates, recipes, training data and server requests may come from strangers. Every size such
an input declares (counts, lengths, dimensions, layers, vocabularies, tensor elements, nesting) is checked against
these limits, and where a file is involved against the file's actual size, before anything is allocated; the error
names the file and field. The limits are far above any real open model (Llama 3.1 405B: 126 layers, hidden 16384,
vocabulary 128256) and far below what would exhaust this machine. docs/security.md explains the threat model.

`check(value, limit, what)` is the one helper: what to say when a declared size is out of bounds.
"""

from __future__ import annotations

from tinkerlm.errors import TinkerError

# -- model files: GGUF headers, config.json, safetensors headers, tokenizers ------------------------------------
MAX_TENSORS = 1 << 16  # tensors in one file (Llama 405B as GGUF: ~1,140)
MAX_METADATA_KEYS = 1 << 16  # GGUF key/value pairs
MAX_STRING_BYTES = 1 << 22  # one GGUF metadata string (a chat template is a few KB)
MAX_ARRAY_ITEMS = 1 << 22  # one GGUF metadata array (vocabulary, merges: ~300k)
MAX_TOKEN_BYTES = 1 << 12  # one vocabulary entry (real ones are tens of bytes)
MAX_VOCAB = 1 << 21  # tokens in a vocabulary
MAX_LAYERS = 1 << 10  # transformer blocks
MAX_WIDTH = 1 << 18  # hidden / intermediate size, heads x head_dim
MAX_HEADS = 1 << 12  # attention heads
MAX_HEAD_DIM = 1 << 12
MAX_CONTEXT = 1 << 24  # positions (also caps the KV cache a config can ask for)
MAX_DIMS = 4  # dimensions of one tensor (ggml's own maximum)
MAX_SAFETENSORS_DIMS = 8  # dimensions of one safetensors tensor (vision towers hold 5-D convolutions)
MAX_ARRAY_DEPTH = 4  # GGUF arrays nested in arrays (real files nest none)
MAX_ELEMENTS = 1 << 40  # elements of one tensor (also checked against the bytes the file holds)
MAX_JSON_BYTES = 1 << 26  # config.json, tokenizer.json, an index or a safetensors header

# -- chat templates (rendered in the Jinja2 sandbox) ------------------------------------------------------------
TEMPLATE_SECONDS = 5.0  # wall-clock time to render one prompt
TEMPLATE_OUTPUT_CHARS = 1 << 23  # characters one rendering may produce
TEMPLATE_SOURCE_CHARS = 1 << 20  # characters of template source
TEMPLATE_WORK_CHARS = 1 << 26  # characters (or list items) all sized operations of one rendering may build
TEMPLATE_INT_BITS = 1 << 16  # bits of an integer a template computes (`**`, `*`)

# -- server requests --------------------------------------------------------------------------------------------
MAX_BODY_BYTES = 8 << 20  # request body, enforced while it streams in
MAX_JSON_DEPTH = 64  # nesting of a request body, a JSONL line, a recipe
MAX_STOP_CHARS = 512  # one stop sequence (holding back a possible stop string is quadratic in its length)

# -- recipes (YAML) and training data (JSONL) -------------------------------------------------------------------
MAX_YAML_ALIASES = 64  # alias references in one recipe (alias bombs expand exponentially)
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = MAX_YAML_BYTES // 2  # values with aliases expanded: no more than an alias-free file could hold
MAX_JSONL_LINE_BYTES = 1 << 24
# fine-tune recipe values (far above real runs, far below what exhausts memory or overflows counters)
MAX_LORA_RANK = 1 << 12
MAX_STEPS = 1 << 31  # max_steps, warmup_steps, eval_every, save_every
MAX_EPOCHS = 1e6
MAX_BATCH = 1 << 16  # batch_size, grad_accum
MAX_THREADS = 1 << 10
MAX_LR = 10.0
# merge recipes
MAX_MERGE_SLICES = 1 << 10  # slices in one recipe (output layers are bounded by MAX_LAYERS too)
MAX_MERGE_INPUTS = 1 << 8  # models merged into one tensor
MAX_MERGE_FACTOR = 1e4  # |weight|, |lambda|, |scale|: beyond this fp32 weights overflow or mean nothing


def check(value: int, limit: int, what: str, hint: str = "the file is corrupt or hostile") -> int:
    """`value` if 0 <= value <= limit, else a TinkerError naming `what` ("model.gguf: llama.block_count")."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value > limit:
        raise TinkerError(f"{what} is {value!r}, outside 0..{limit} ({hint})")
    return value
