"""Attention kernels over rBlocks: Triton kernels with torch references beside them."""
