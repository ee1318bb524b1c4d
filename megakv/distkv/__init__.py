"""DistKV (DistKV-LLM sections 4-5): gManager, DGFM, the cluster's control plane and the remote micro-attention
data plane.

The bookkeeping modules (messages, gmanager, control, policy) are plain Python state machines whose
messages a mailbox carries; each instance's rManager, which a lone instance needs too, is
megakv.kvcache.rmanager. Only remote_attention touches tensors: it implements the attention layer's
RemoteAttention (megakv.attention.remote) over the KV links.
"""
