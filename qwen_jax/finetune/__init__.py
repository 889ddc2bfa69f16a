"""Fine-tuning: LoRA / Q-LoRA adapters on a frozen base (qwen_jax.finetune.train), PEFT-compatible files."""

from qwen_jax.finetune.adapters import AdapterError
from qwen_jax.finetune.data import DataError
from qwen_jax.finetune.lora import LoraConfig
from qwen_jax.finetune.merged import save_checkpoint
from qwen_jax.finetune.train import TrainConfig, TrainResult, finetune

__all__ = ["AdapterError", "DataError", "LoraConfig", "TrainConfig", "TrainResult", "finetune", "save_checkpoint"]
