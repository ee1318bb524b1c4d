"""DistKV (DistKV-LLM sections 4-5): rManager, gManager, DGFM and the remote micro-attention data plane.

The bookkeeping modules (messages, rmanager, gmanager, dgfm, control) are plain
Python with an injected transport; only remote_attention touches tensors.
"""
