"""Our safetensors reader and writer against the reference `safetensors` library (both directions)."""

import ml_dtypes
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwen_jax import testing
from qwen_jax.checkpoint.safetensors_io import SafetensorsCheckpoint


def test_reads_files_written_by_safetensors(tmp_path):
    tensors = {
        "a.bf16": torch.randn(3, 5, dtype=torch.bfloat16),
        "b.f16": torch.randn(7, dtype=torch.float16),
        "c.i32": torch.randint(-2**31, 2**31 - 1, (4, 2), dtype=torch.int32),
        "d.f32": torch.randn(2, 2, 2),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = SafetensorsCheckpoint(tmp_path)
    for name, want in tensors.items():
        got = np.asarray(ckpt.get(name))
        if want.dtype == torch.bfloat16:
            assert got.dtype == ml_dtypes.bfloat16
            want = want.float()
            got = got.astype(np.float32)
        np.testing.assert_array_equal(got, want.numpy())


def test_files_we_write_read_back_with_safetensors(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"x": rng.standard_normal((5, 3)).astype(np.float16), "y": rng.integers(0, 9, (2, 4), dtype=np.int32),
              "z": rng.standard_normal(3).astype(ml_dtypes.bfloat16)}
    testing.write_safetensors(tmp_path / "t.safetensors", [(n, a.shape, a.dtype, lambda a=a: a) for n, a in arrays.items()])
    with safe_open(tmp_path / "t.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(arrays)
        for name, want in arrays.items():
            got = f.get_tensor(name)
            np.testing.assert_array_equal(got.float().numpy(), want.astype(np.float32))


def test_sharded_checkpoint_has_published_layout(tiny_dir, tiny_config):
    import json

    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert "transformer.h.0.attn.c_attn.weight" in index["weight_map"]
    with safe_open(tiny_dir / index["weight_map"]["lm_head.weight"], framework="pt") as f:
        assert list(f.get_slice("lm_head.weight").get_shape()) == [tiny_config.vocab_size, tiny_config.hidden_size]
    assert index["metadata"]["total_size"] == sum(
        (tiny_dir / s).stat().st_size for s in shards) - sum(_header_bytes(tiny_dir / s) for s in shards)
    for name in ("config.json", "generation_config.json", "qwen.tiktoken"):
        assert (tiny_dir / name).is_file()


def _header_bytes(path):
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")
