"""Serving: the OpenAI-compatible HTTP server, its session store and its settings."""
