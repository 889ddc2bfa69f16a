"""qwen_jax: a pure-JAX inference engine for Qwen (v1) chat models."""

from qwen_jax.chat_api import chat, chat_stream, generate
from qwen_jax.chat_format import build_chat_prompt
from qwen_jax.checkpoint import CheckpointError
from qwen_jax.config import ConfigError, QwenConfig, preset
from qwen_jax.loading import load
from qwen_jax.model import QwenModel
from qwen_jax.tokenizer import QwenTokenizer

__all__ = ["CheckpointError", "ConfigError", "QwenConfig", "QwenModel", "QwenTokenizer", "build_chat_prompt", "chat",
           "chat_stream", "generate", "load", "preset"]
