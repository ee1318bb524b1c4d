"""DistAttention: attention over a request's rBlocks as exactly merged micro-attentions."""
