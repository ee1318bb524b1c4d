"""DistKV (DistKV-LLM sections 4-5): rManager, gManager, DGFM and the remote micro-attention data plane.

The bookkeeping modules (messages, rmanager, gmanager, control) are plain Python
state machines whose messages a mailbox carries; only remote_attention touches tensors.
"""
