"""megakv serve: an OpenAI-compatible HTTP server over the engine or a DistKV cluster."""
