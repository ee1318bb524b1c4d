"""Parallel state, Megatron autograd mapping pairs, and tensor-parallel layers."""
