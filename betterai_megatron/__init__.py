"""betterai_megatron: a Megatron-style, 3D-parallel trainer for coding language models on megatron-core."""

__version__ = "0.1.0"
