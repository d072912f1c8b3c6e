"""`tinkerlm serve`: an OpenAI-compatible HTTP server over the continuous-batching engine, with a web playground.

server.py (HTTP API, SSE, metrics, shutdown), protocol.py (request validation derived from the sampling
declaration, error shapes), static/index.html (playground). Generation itself is tinkerlm.batching and
tinkerlm.sampling.
"""
