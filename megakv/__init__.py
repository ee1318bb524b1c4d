"""megakv: DistKV-LLM inference (arXiv 2401.02669)."""
