"""megakv checkpoints: the on-disk format, TP sharding, and converters from training frameworks.

A megakv checkpoint is a folder with ``megakv_config.json`` and one safetensors
file per tensor-parallel rank holding exactly the parameters that rank's model
owns (Megatron-core names), so loading is a plain ``load_state_dict``.
"""
