"""The rBlock cache: the free-block pool, the rManager's block tables (plain bookkeeping) and the KV tensors
they index."""
