"""Prefix caching over rBlocks (vLLM's automatic prefix caching): block hashes.

A full block's hash covers its tokens and, through its predecessor's hash, every
token before it, so equal hashes mean equal KV (the same model). A request's salt
starts the chain: requests with different salts never share blocks. SHA-256 over
the token ids makes a collision as unlikely as in vLLM's default, and the hashes
are the same in every process, so tensor-parallel ranks that schedule alike
cache alike. The pool that maps hashes to blocks is megakv.kvcache.block_pool.
"""
from __future__ import annotations

import hashlib
from array import array

# What the first block's hash continues, salted per tenant (vLLM's cache_salt).
ROOT = b"megakv prefix cache"


def chain_root(salt: str | None) -> bytes:
    """The hash a request's first block continues."""
    return ROOT if salt is None else hashlib.sha256(ROOT + salt.encode("utf-8", "surrogatepass")).digest()


def extend_block_hashes(block_hashes: list[bytes], token_ids: list[int], num_tokens: int, block_size: int,
                        salt: str | None) -> None:
    """Append to ``block_hashes`` (those of the first blocks of ``token_ids``) the hashes of the other full blocks
    among the first ``num_tokens`` tokens."""
    parent = block_hashes[-1] if block_hashes else chain_root(salt)
    for index in range(len(block_hashes), num_tokens // block_size):
        tokens = array("q", token_ids[index * block_size:(index + 1) * block_size])
        parent = hashlib.sha256(parent + tokens.tobytes()).digest()
        block_hashes.append(parent)
