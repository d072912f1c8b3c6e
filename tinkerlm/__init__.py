"""tinkerlm: run, inspect, remix, evaluate, serve and share open-weight language models on your own machine.

`import tinkerlm` is cheap (no torch); `tinkerlm.load(...)` imports the model stack on first use.
"""

__version__ = "0.1.0"


def load(name_or_path: str, **kwargs):
    """Load a model from the store (pulling it if missing), a GGUF file or a Hugging Face directory.

    Returns an `LLM` with `generate`, `stream` and `chat`. See `tinkerlm.api.load`.
    """
    from tinkerlm.api import load as _load

    return _load(name_or_path, **kwargs)
