"""Edits of a checkpoint directory for the bad-input tests: rewrite the tensors of one shard, keeping the index
consistent with it."""

import json

import numpy as np

from qwen_jax import testing
from qwen_jax.checkpoint import SafetensorsCheckpoint


def rewrite_tensors(directory, name, mutate):
    """Rewrite the shard holding tensor `name` after `mutate(tensors)` (a dict name -> array); returns the shard."""
    reader = SafetensorsCheckpoint(directory)
    shard = reader.info(name).file
    tensors = {n: np.array(reader.get(n)) for n, info in reader.tensors.items() if info.file == shard}
    mutate(tensors)
    testing.write_safetensors(shard, [(n, a.shape, a.dtype, (lambda a=a: a)) for n, a in tensors.items()])
    index_file = directory / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"] = {n: s for n, s in index["weight_map"].items() if s != shard.name or n in tensors}
    index_file.write_text(json.dumps(index))
    return shard.name
