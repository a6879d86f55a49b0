"""OpenAI-compatible HTTP server (see api_server.py)."""
