"""Model definitions built from Megatron tensor-parallel layers."""
