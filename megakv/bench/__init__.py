"""Benchmarks that drive a running server: ``megakv bench serve``, a load generator for OpenAI-compatible APIs."""
