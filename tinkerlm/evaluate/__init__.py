"""Evaluation: benchmarks, perplexity and KL divergence, with per-item records (`tinkerlm eval`).

from tinkerlm.evaluate import evaluate, perplexity, shipped_text
results = evaluate("smollm2", ["arc_easy", "perplexity"], limit=100)
ppl = perplexity(llm.model, llm.tokenizer, shipped_text(), context=512)
"""

from tinkerlm.evaluate.perplexity import perplexity, shipped_text, token_nll
from tinkerlm.evaluate.run import evaluate

__all__ = ["evaluate", "perplexity", "shipped_text", "token_nll"]
