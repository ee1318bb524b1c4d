"""The rBlock cache: the free-block pool (plain bookkeeping) and the KV tensors it indexes."""
