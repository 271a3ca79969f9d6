"""Entropy kernels (import as ``sentinel_vllm.kernels``)."""
