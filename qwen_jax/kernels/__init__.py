"""Pallas kernels for the GPU; each module keeps an XLA fallback and is tested against qwen_jax's XLA reference."""
