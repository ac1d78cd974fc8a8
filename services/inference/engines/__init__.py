"""Engines the inference service can serve a chat completion from."""
