"""`python -m convert SRC DST`: orbax output that loads bit-identically, validated, atomic, refused when incomplete."""

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import qwen_jax
from convert import convert
from qwen_jax.checkpoint import CheckpointError, orbax_io
from tests.checkpoint_edits import rewrite_tensors

REPO = Path(__file__).resolve().parents[1]


def assert_same_params(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_cli_converts_with_progress_and_loads_bit_identically(tmp_path, tiny_gptq_dir):
    dst = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "convert", str(tiny_gptq_dir), str(dst)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    # tqdm's bar: bytes done/total [elapsed<ETA, rate].
    bar = r"100%\|[^|]*\| ([\d.]+[kMG]?)/\1 \[\d+:\d+<\d+:\d+, [\d.]+[kMG]?B/s"
    assert re.search(bar, result.stderr), result.stderr
    assert {p.name for p in dst.iterdir()} == {"config.json", "generation_config.json", "qwen.tiktoken",
                                               "quantize_config.json", "params", orbax_io.MARKER}
    marker = json.loads((dst / orbax_io.MARKER).read_text())
    assert marker["quant_group"] == 32 and marker["format"] == orbax_io.FORMAT
    for dtype in ("float32", "bfloat16"):
        converted, tokenizer = qwen_jax.load(dst, dtype=dtype)
        direct, _ = qwen_jax.load(tiny_gptq_dir, dtype=dtype)
        assert converted.quant_group == direct.quant_group == 32
        assert converted.generation_config == direct.generation_config
        assert_same_params(converted.params, direct.params)
    assert tokenizer.encode("Hello, world!") == [9707, 11, 1879, 0]


def test_cli_reports_errors(tmp_path, tiny_gptq_converted):
    result = subprocess.run([sys.executable, "-m", "convert", str(tiny_gptq_converted), str(tmp_path / "x")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "already a converted qwen_jax checkpoint" in result.stderr


def test_float_checkpoint_converts_too(tmp_path, tiny_dir):
    dst = convert(tiny_dir, tmp_path / "float", progress=False)
    converted, _ = qwen_jax.load(dst, dtype="float32")
    assert converted.quant_group is None
    assert_same_params(converted.params, qwen_jax.load(tiny_dir, dtype="float32")[0].params)


def test_refuses_an_existing_destination(tmp_path, tiny_gptq_dir):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="out: already exists"):
        convert(tiny_gptq_dir, tmp_path / "out", progress=False)


def test_validates_the_whole_source_before_writing(tmp_path, tiny_gptq_dir):
    src = tmp_path / "src"
    shutil.copytree(tiny_gptq_dir, src)
    name = "transformer.h.1.mlp.c_proj.scales"  # the last layer: a streaming-only check would write first
    rewrite_tensors(src, name, lambda t: t.__setitem__(name, np.full_like(t[name], np.inf)))
    with pytest.raises(CheckpointError, match=rf"tensor {name}: non-finite scale inf"):
        convert(src, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no staging directory


@pytest.fixture
def converted(tmp_path, tiny_gptq_converted):
    directory = tmp_path / "converted"
    shutil.copytree(tiny_gptq_converted, directory)
    return directory


@pytest.mark.parametrize("victim", ["config.json", "qwen.tiktoken", "params/h_1/_METADATA", "ocdbt-data"])
def test_converted_directory_missing_a_file(converted, victim):
    if victim == "ocdbt-data":
        victim = str(next((converted / "params" / "h_0").rglob("d/*")).relative_to(converted))
    (converted / victim).unlink()
    with pytest.raises(CheckpointError, match=rf"converted/{victim}: missing from the converted checkpoint"):
        qwen_jax.load(converted)


def test_converted_file_of_the_wrong_size(converted):
    data = max((converted / "params" / "h_1").rglob("d/*"), key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=rf"{data.name}: \d+ bytes, {orbax_io.MARKER} says \d+"):
        qwen_jax.load(converted)


def test_converted_directory_without_marker(converted):
    (converted / orbax_io.MARKER).unlink()
    with pytest.raises(CheckpointError, match=rf"no {orbax_io.MARKER}: an incomplete \(interrupted\?\) qwen_jax "
                                              r"conversion"):
        qwen_jax.load(converted)


# Runs the real CLI, stalled after two modules are written so that it can be killed mid-conversion.
_STALLING_CONVERT = r"""
import sys, time
from pathlib import Path
from qwen_jax.checkpoint import orbax_io
import convert.__main__

flag, written = Path(sys.argv.pop(1)), []
write = orbax_io.ModuleWriter.write

def stalling_write(self, module, arrays):
    write(self, module, arrays)
    written.append(module)
    if len(written) == 2:
        self._checkpointer.wait_until_finished()
        flag.write_text(" ".join(written))
        time.sleep(600)

orbax_io.ModuleWriter.write = stalling_write
sys.exit(convert.__main__.main(sys.argv[1:]))
"""


def test_killed_conversion_leaves_nothing_loadable(tmp_path, tiny_gptq_dir):
    dst, flag = tmp_path / "out", tmp_path / "stalled"
    proc = subprocess.Popen([sys.executable, "-c", _STALLING_CONVERT, str(flag), str(tiny_gptq_dir), str(dst),
                             "--no-progress"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flag.exists(), proc.stderr.read() if proc.poll() is not None else "timed out"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()

    assert not dst.exists()
    (staging,) = tmp_path.glob(".out.converting-*")
    assert sorted(p.name for p in (staging / "params").iterdir()) == sorted(flag.read_text().split())
    with pytest.raises(CheckpointError, match="incomplete"):
        qwen_jax.load(staging)

    # The next conversion to the same destination clears the dead one's staging directory and succeeds.
    convert(tiny_gptq_dir, dst, progress=False)
    assert not staging.exists()
    assert qwen_jax.load(dst)[0].quant_group == 32


def test_qwen_jax_never_imports_convert():
    for file in (REPO / "qwen_jax").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "convert" or n.startswith("convert.") for n in names), file
