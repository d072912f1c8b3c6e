"""`tinkerlm serve`: an OpenAI-compatible HTTP server with continuous batching and a web playground.

server.py (HTTP API, SSE, metrics, shutdown), scheduler.py (the batching engine), protocol.py (request validation,
error shapes), jsonmode.py (JSON-constrained decoding), vocab.py (token bytes), static/index.html (playground).
"""
