"""Evaluation: perplexity on a fixed shipped text (more benchmarks follow).

from tinkerlm.evaluate import perplexity, shipped_text
ppl = perplexity(llm.model, llm.tokenizer, shipped_text(), context=512)
"""

from tinkerlm.evaluate.perplexity import perplexity, shipped_text, token_nll

__all__ = ["perplexity", "shipped_text", "token_nll"]
