"""The kernels under a mesh: every strategy runs the int8/float matmul, the cache attention and the prefill
attention on each device's shards (`shard_map`, specs from the rules), and equals the single-device XLA path.

The Pallas kernels run in Pallas's interpreter on 8 simulated CPU devices (cuDNN's flash attention, which has no
CPU form, is stood in for by XLA's fused-attention reference under the same per-shard call). The model is sized so
that every sharded weight of every built-in strategy fits the kernel's tiling (local N a multiple of 64, local K a
multiple of 128 for float weights, whole groups for int8).

Every strategy is checked op by op on two meshes, every mesh by three strategies (each linear, int8 and float;
attention over a float and an int8 cache, decode and chunk queries); whole models (a prefill, a chunk over the
cache, decode steps) on four strategy × mesh pairs, since each interpreted model costs ~20 s of compilation on the
CPU.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen_jax
from qwen_jax import attention, quant, sharding, sharding_lab, testing
from qwen_jax import cache as kv_cache
from qwen_jax.config import preset
from qwen_jax.kernels import cache_attention
from qwen_jax.kernels import int8_matmul as km
from qwen_jax.model import apply
from tests.oracle import rel_err

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets XLA_FLAGS)")

VOCAB = 4096  # ids stay below it; a small table keeps 8 replicated copies cheap
CONFIG = preset("tiny").replace(hidden_size=1024, num_attention_heads=8, kv_channels=128, intermediate_size=2048,
                                vocab_size=VOCAB)
MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]
# Op-level checks run each strategy on two of the four meshes (every mesh is met by three strategies): each
# interpreted kernel program costs seconds of CPU compilation, and CI has two cores.
STRATEGY_MESHES = {name: [MESHES[i % 4], MESHES[(i + 2) % 4]] for i, name in enumerate(sorted(sharding.STRATEGIES))}
GROUP = 64


@pytest.fixture(scope="module")
def checkpoints(checkpoint_pair):
    return checkpoint_pair(CONFIG, seed=5, group_size=GROUP)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(3).integers(0, VOCAB, (8, 7)).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("module", "mesh", "rules"))
def _cached_forward(module, params, ids, positions, cache, mesh=None, rules=()):
    alpha = jnp.ones(ids.shape[0], jnp.float32)
    return apply(module, params, ids, positions, alpha, cache, mesh=mesh, rules=rules)


def _run(model, ids):
    """Logits [8, 5 + 5 + 1 + 1, vocab]: a whole-prompt forward of 5 tokens (prefill attention), then a chunk of 5
    tokens over an empty cache (attention over the cache, several queries a row) and two decode steps over it."""
    outs = [model.logits(ids[:, :5])]
    cache = model.new_cache(ids.shape[0], 16)
    for start, stop in ((0, 5), (5, 6), (6, 7)):
        positions = np.broadcast_to(np.arange(start, stop, dtype=np.int32), (ids.shape[0], stop - start))
        logits, cache = _cached_forward(model.module, model.params, ids[:, start:stop], positions, cache,
                                        **model.placement)
        outs.append(logits)
    return np.concatenate([np.asarray(o) for o in outs], axis=1)


@pytest.fixture(scope="module")
def references(checkpoints, ids):
    """Single device, XLA paths (no kernel runs on the CPU backend)."""
    return {kind: _run(qwen_jax.load(path, dtype="float32")[0], ids) for kind, path in checkpoints.items()}


@pytest.fixture
def kernel_calls(monkeypatch):
    """Route every kernel through Pallas's interpreter as a GPU would route it to the device; return the weight
    shapes each matmul kernel call saw (recorded while tracing: local shards under a mesh)."""
    calls = []
    matmul = km.matmul

    def recording_matmul(x, weight, *rest, **kwargs):
        calls.append(tuple(weight.shape))
        return matmul(x, weight, *rest, **kwargs, interpret=True)

    monkeypatch.setattr(km, "supported", functools.partial(km.supported, interpret=True))
    monkeypatch.setattr(km, "matmul", recording_matmul)
    monkeypatch.setattr(kv_cache, "kernel_applies", lambda *args, **kwargs: True)
    monkeypatch.setattr(cache_attention, "attend",
                        functools.partial(cache_attention.attend, interpret=True))
    monkeypatch.setattr(attention, "flash_applies", lambda *args, **kwargs: True)
    monkeypatch.setattr(attention, "_flash", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
    return calls


def _placed(tree, mesh, rules):
    """Random arrays for `abstract_params`' boxes, placed as the rules say."""
    shardings = sharding.shardings(tree, mesh, rules) if mesh is not None else None
    leaves, treedef = jax.tree_util.tree_flatten(nn.unbox(tree))
    rng = np.random.default_rng(7)
    arrays = [rng.integers(-128, 128, a.shape).astype(np.int8) if a.dtype == jnp.int8
              else rng.uniform(1e-3, 1e-2, a.shape).astype(a.dtype) if a.dtype == jnp.float16
              else (rng.standard_normal(a.shape) * 0.05).astype(a.dtype) for a in leaves]
    placed = jax.tree_util.tree_unflatten(treedef, arrays)
    return placed if shardings is None else jax.device_put(placed, shardings)


LINEARS = {"attn/c_attn": ("layers", "attn", "c_attn"), "attn/c_proj": ("layers", "attn", "c_proj"),
           "mlp/w1w2": ("layers", "mlp", "w1w2"), "mlp/c_proj": ("layers", "mlp", "c_proj"), "lm_head": ("lm_head",)}


def _linears(params, names, mesh=None, rules=()):
    """Every linear of the model applied to x [8, 2, K] (layer 1 of the stacks), as the model calls quant.matmul."""
    def run(params, xs):
        outs = {}
        for label, path in LINEARS.items():
            weight, axes = params, names
            for key in path:
                weight, axes = weight[key], axes[key]
            weight = {k: v for k, v in weight.items() if k != "bias"}
            axes = tuple(axes["qvalue" if "qvalue" in weight else "kernel"])
            layer = jnp.int32(1) if path[0] == "layers" else None
            outs[label] = quant.matmul(xs[label], weight, layer=layer, axes=axes[1:] if layer is not None else axes)
        return outs

    xs = {label: jax.random.normal(jax.random.key(i), (8, 2, k), jnp.float32)
          for i, (label, k) in enumerate([("attn/c_attn", 1024), ("attn/c_proj", 1024), ("mlp/w1w2", 1024),
                                          ("mlp/c_proj", 1024), ("lm_head", 1024)])}
    if mesh is None:
        return jax.jit(run)(params, xs)
    with sharding.activate(mesh, rules):
        return jax.jit(run)(params, xs)


@pytest.mark.parametrize("strategy", sorted(sharding.STRATEGIES))
def test_linears_on_local_shards_match_one_device(strategy, kernel_calls):
    """Each linear, int8 (group 64) and float, on two meshes: the kernel on the shards (all 5 of them), then the
    sums over a split K: float32, equal to the unsharded XLA path up to summation order."""
    for group in (GROUP, None):
        tree = qwen_jax.model.abstract_params(CONFIG, jnp.float32, group)
        want = _linears(_placed(tree, None, ()), _axis_names(tree))
        for data, model_axis in STRATEGY_MESHES[strategy]:
            mesh = sharding.make_mesh({"data": data, "model": model_axis})
            rules = sharding.get_rules(strategy)
            kernel_calls.clear()
            got = _linears(_placed(tree, mesh, rules), _axis_names(tree), mesh, rules)
            assert len(kernel_calls) == len(LINEARS), (group, data, model_axis, kernel_calls)
            for label in LINEARS:
                assert rel_err(got[label], want[label]) <= 1e-5, (group, data, model_axis, label)


def _axis_names(tree):
    """{...: {array name: logical axes}} of an abstract parameter tree."""
    return jax.tree_util.tree_map(lambda box: box.names, tree,
                                  is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


@pytest.mark.parametrize("strategy", sorted(sharding.STRATEGIES))
def test_cache_attention_on_local_shards_matches_one_device(strategy, kernel_calls):
    """Decode (1 query a row) and chunk (4 queries a row) attention over a float32 and an int8 cache placed by the
    rules: the kernel on each device's rows and heads equals the XLA path on one device."""
    rng = np.random.default_rng(11)
    heads, hd, slots = CONFIG.num_attention_heads, CONFIG.head_dim, 16
    for kv_dtype in (jnp.float32, jnp.int8):
        full = kv_cache.init_cache(CONFIG, 8, slots, kv_dtype)
        k, v = (rng.standard_normal((8, slots, heads, hd)).astype(np.float32) for _ in range(2))
        for layer in range(CONFIG.num_hidden_layers):
            full = kv_cache.write(full, layer, k, v, jnp.zeros(8, jnp.int32))
        queries = {s: rng.standard_normal((8, s, heads, hd)).astype(np.float32) for s in (1, 4)}
        positions = {s: (rng.integers(3, slots - s, 8)[:, None] + np.arange(s)).astype(np.int32) for s in (1, 4)}

        def attend(cache, mesh=None, rules=()):
            def run(cache, q, pos):
                return {s: kv_cache.attend(cache, jnp.int32(1), q[s], pos[s]) for s in q}
            if mesh is None:
                return jax.jit(run)(cache, queries, positions)
            with sharding.activate(mesh, rules):
                return jax.jit(run)(cache, queries, positions)

        want = attend(full)
        for data, model_axis in STRATEGY_MESHES[strategy]:
            mesh = sharding.make_mesh({"data": data, "model": model_axis})
            placed = kv_cache.init_cache(CONFIG, 8, slots, kv_dtype, mesh=mesh, rules=strategy)
            placed = {name: jax.device_put(full[name], placed[name].sharding) for name in placed}
            got = attend(placed, mesh, sharding.get_rules(strategy))
            for s in queries:
                assert rel_err(got[s], want[s]) <= 1e-5, (kv_dtype, data, model_axis, s)


@pytest.mark.parametrize("kind, strategy, mesh_shape", [("gptq", "tp", (1, 8)), ("gptq", "dp_tp", (2, 4)),
                                                        ("float", "fsdp_tp", (4, 2)), ("float", "fsdp", (8, 1))])
def test_model_on_the_kernel_path_matches_single_device(checkpoints, ids, references, kernel_calls, kind, strategy,
                                                        mesh_shape):
    """float32 logits of a prefill, a chunk over the cache and decode steps: the same math as the reference up to
    summation order (≤ 1e-4 relative)."""
    data, model_axis = mesh_shape
    mesh = sharding.make_mesh({"data": data, "model": model_axis})
    model, _ = qwen_jax.load(checkpoints[kind], dtype="float32", mesh=mesh, strategy=strategy)
    kernel_calls.clear()
    got = _run(model, ids)
    assert kernel_calls
    assert rel_err(got, references[kind]) <= 1e-4


def test_every_linear_takes_the_kernel(checkpoints, ids, kernel_calls):
    """Under tp on 1×8, each layer linear runs on its 1/8 shard (column-parallel c_attn / w1‖w2: N / 8;
    row-parallel c_proj: K / 8), float and int8 alike."""
    for kind in ("float", "gptq"):
        model, _ = qwen_jax.load(checkpoints[kind], dtype="float32", strategy="tp")
        kernel_calls.clear()
        model.logits(ids)
        layers = CONFIG.num_hidden_layers
        assert {(layers, 1024, 3, 1, 128), (layers, 128, 1024), (layers, 1024, 2, 128),
                (layers, 128, 1024)} <= set(kernel_calls), kernel_calls


def test_custom_rules_take_the_kernel_path(checkpoints, ids, references, kernel_calls):
    """A table of one's own — here only the MLP split, over both mesh axes — runs the kernels on its shards."""
    rules = (("mlp", ("data", "model")), ("act_mlp", ("data", "model")))
    model, _ = qwen_jax.load(checkpoints["gptq"], dtype="float32", mesh=sharding.make_mesh({"data": 2, "model": 4}),
                             strategy=rules)
    kernel_calls.clear()
    got = _run(model, ids)
    assert (CONFIG.num_hidden_layers, 128, 1024) in kernel_calls  # mlp.c_proj's K split 8 ways
    assert rel_err(got, references["gptq"]) <= 1e-4


def test_tp_decode_step_on_the_kernel_path_has_two_all_reduces_per_layer(checkpoints, kernel_calls):
    """The kernels' partial sums are the only collectives of a tp decode step: 2 all-reduces per layer (HLO, loop
    body counted once per layer), no weight gathered."""
    counts = {}
    for layers in (2, 4):
        config = CONFIG.replace(num_hidden_layers=layers)
        path = testing.write_gptq_checkpoint(checkpoints["gptq"].parent / f"layers{layers}", config, seed=1,
                                             group_size=GROUP)
        model, _ = qwen_jax.load(path, dtype="float32", strategy="tp")
        found = sharding_lab.report(model, "tp", batch=1, kv_len=32, steps=1).collectives
        counts[layers] = found
        assert found.get("all-gather", (0, 0))[1] < 128 * 1024 // 8, f"weights gathered: {found}"
    assert counts[4]["all-reduce"][0] - counts[2]["all-reduce"][0] == 2 * 2, counts


def test_a_split_that_breaks_a_quantization_group_is_refused():
    """fsdp over 8 devices cuts K = 1024 into 128-row shards: groups of 256 would straddle them."""
    tree = qwen_jax.model.abstract_params(CONFIG, jnp.float32, 256)
    with pytest.raises(sharding.ShardingError, match=r"scales .*4 groups of 256 inputs.*8 devices.*whole groups"):
        sharding.check(tree, sharding.make_mesh({"data": 8, "model": 1}), "fsdp")
