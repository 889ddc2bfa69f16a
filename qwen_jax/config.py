"""`QwenConfig`: the hyper-parameters of a Qwen (v1) model, read from a checkpoint's config.json."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

# Number of real token ids (BPE ranks + special tokens); embedding rows at or past it are padding.
NUM_REAL_TOKENS = 151851


class ConfigError(ValueError):
    """A config.json that is missing, malformed or describes a model we cannot run."""


@dataclasses.dataclass(frozen=True)
class QwenConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int  # as written in config.json: the MLP width is half of it
    vocab_size: int  # embedding rows, padded past the real ids
    kv_channels: int = 128
    rotary_emb_base: float = 10000.0
    rotary_pct: float = 1.0
    seq_length: int = 8192
    layer_norm_epsilon: float = 1e-6
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    tie_word_embeddings: bool = False
    num_real_tokens: int = NUM_REAL_TOKENS

    def __post_init__(self):
        # heads × kv_channels == hidden_size holds for every Qwen checkpoint and is checked on reading one
        # (`from_dict`); the model itself only needs the attention width heads × kv_channels, so a config of one
        # device's tensor-parallel shard (fewer heads, same hidden size: sharding_lab.tp_shard_config) is valid.
        if self.intermediate_size % 2:
            raise ConfigError(f"intermediate_size must be even (the MLP width is half of it), got {self.intermediate_size}")
        if self.kv_channels % 2:
            raise ConfigError(f"kv_channels must be even for rotary embeddings, got {self.kv_channels}")
        if self.rotary_pct != 1.0:
            raise ConfigError(f"rotary_pct {self.rotary_pct} is not supported (every released Qwen v1 uses 1.0)")
        if self.tie_word_embeddings:
            raise ConfigError("tied word embeddings are not supported: Qwen v1 has an untied lm_head")
        if not self.no_bias:
            raise ConfigError("no_bias=false is not supported: Qwen v1 has biases on c_attn only")

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size // 2

    @property
    def num_params(self) -> int:
        d, f, v, a = self.hidden_size, self.mlp_width, self.vocab_size, self.num_attention_heads * self.kv_channels
        per_layer = (d * 3 * a + 3 * a) + a * d + 3 * d * f + 2 * d
        return 2 * v * d + self.num_hidden_layers * per_layer + d

    def ntk_alpha(self, true_length: int) -> float:
        """Dynamic-NTK factor for a prompt of `true_length` tokens (1 when NTK is off or the prompt fits)."""
        if not self.use_dynamic_ntk or true_length <= 0:
            return 1.0
        context_value = math.log2(true_length / self.seq_length) + 1
        return float(max(2 ** math.ceil(context_value) - 1, 1))

    def replace(self, **changes) -> "QwenConfig":
        return dataclasses.replace(self, **changes)

    # --- config.json ---------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "QwenConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in raw]
        if missing:
            raise ConfigError(f"{source}: missing required keys {missing}")
        model_type = raw.get("model_type", "qwen")
        if model_type != "qwen":
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'qwen' (Qwen v1)")
        kwargs = {k: raw[k] for k in fields if k in raw and k != "num_real_tokens"}
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                    "kv_channels", "seq_length"):
            if key in kwargs and (not isinstance(kwargs[key], int) or kwargs[key] <= 0):
                raise ConfigError(f"{source}: {key} must be a positive integer, got {kwargs[key]!r}")
        try:
            config = cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        if config.num_attention_heads * config.kv_channels != config.hidden_size:
            raise ConfigError(f"{source}: num_attention_heads ({config.num_attention_heads}) × kv_channels "
                              f"({config.kv_channels}) must equal hidden_size ({config.hidden_size})")
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> "QwenConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found (a Qwen checkpoint directory must hold config.json)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The config.json keys as the published Qwen checkpoints write them."""
        raw = {k: v for k, v in dataclasses.asdict(self).items() if k != "num_real_tokens"}
        raw.update(
            architectures=["QWenLMHeadModel"],
            model_type="qwen",
            auto_map={
                "AutoConfig": "configuration_qwen.QWenConfig",
                "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
            },
            bf16=False, fp16=True, fp32=False,
            emb_dropout_prob=0.0, attn_dropout_prob=0.0, initializer_range=0.02,
            max_position_embeddings=self.seq_length, scale_attn_weights=True, use_cache=True,
            use_flash_attn="auto", tokenizer_class="QWenTokenizer", torch_dtype="float16",
            softmax_in_fp32=False, use_cache_quantization=False, use_cache_kernel=False,
        )
        return raw


# Presets: the published configs (QWEN_SPEC §1) and tiny sizes for tests and the embedded demo.
PRESETS: dict[str, QwenConfig] = {
    "72b": QwenConfig(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, intermediate_size=49152,
                      vocab_size=152064, rotary_emb_base=1e6, seq_length=32768,
                      use_dynamic_ntk=False, use_logn_attn=False),
    "14b": QwenConfig(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, intermediate_size=27392,
                      vocab_size=152064, rotary_emb_base=1e4, seq_length=2048),
    "7b": QwenConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=22016,
                     vocab_size=151936, rotary_emb_base=1e4, seq_length=8192),
    "1.8b": QwenConfig(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=11008,
                       vocab_size=151936, rotary_emb_base=1e4, seq_length=8192),
    # Tiny sizes keep the real vocabulary so that the real tokenizer and chat format run end to end.
    # head_dim 32 (not 128) keeps them small; group size 32 divides every K of these shapes.
    "tiny": QwenConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, kv_channels=32,
                       intermediate_size=256, vocab_size=151936, rotary_emb_base=1e4, seq_length=8192,
                       use_dynamic_ntk=False, use_logn_attn=False),
    "tiny-ntk": QwenConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, kv_channels=32,
                           intermediate_size=256, vocab_size=151936, rotary_emb_base=1e4, seq_length=16),
}


def preset(name: str) -> QwenConfig:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
