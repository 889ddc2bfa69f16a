"""Checkpoint readers (HF float safetensors, GPTQ Int8, converted orbax) and placement of their tensors onto devices."""

from qwen_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsCheckpoint
from qwen_jax.checkpoint.loader import load_params, open_checkpoint

__all__ = ["CheckpointError", "SafetensorsCheckpoint", "load_params", "open_checkpoint"]
