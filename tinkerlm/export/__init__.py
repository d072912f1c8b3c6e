"""`tinkerlm export`: write a model as a GGUF file (optionally quantized) or a Hugging Face folder, with what makes
it usable elsewhere (an Ollama Modelfile, a model card) and proof that it still is the model it came from.

verify.py compares the written model with its source (KL divergence, top-1 agreement, perplexity); imatrix.py
computes and reads llama.cpp importance matrices; ollama.py writes Modelfiles; card.py writes model cards.
"""
