"""Sharding on 8 simulated CPU devices (tests/conftest.py): the mesh and rules from config, the state created
sharded, the jitted step (explicit shardings, one compilation, gradient accumulation), early refusals.

Tolerances: the sharded runs differ from the 1-device run only in float32 summation order (partial sums per
shard, then an all-reduce). Measured here over 3 steps: losses within 4e-7 relative, parameters within
2e-6 absolute (AdamW normalises tiny gradients, so near-zero entries move by ~lr x noise); asserted with
rtol 1e-5 on the losses and rtol = atol = 1e-5 on the parameters.
"""

import functools

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from bat_jax.train import config as train_config
from bat_jax.train import mesh as mesh_lib
from bat_jax.train import sharded
from tests.train import conftest

STEPS = 3
BATCH = 16  # divides over 8 devices x 2 micro-batches
LOSS_RTOL = 1e-5
PARAM_TOL = 1e-5


def small_cfg(shape=(1, 1), fsdp=True) -> ml_collections.ConfigDict:
    """The conftest's cut-down tiny config with 2 blocks and BATCH clips."""
    return conftest.small_cfg(shape, batch=BATCH, depth=2, fsdp=fsdp)


def make(cfg):
    devices = jax.devices()[: cfg.mesh.shape.data * cfg.mesh.shape.fsdp]
    mesh = mesh_lib.make_mesh(cfg, devices)
    return mesh, mesh_lib.logical_rules(cfg), train_config.ssl_config(cfg), train_config.optimizer(cfg)


def spec_batch() -> np.ndarray:
    return np.random.default_rng(0).random((BATCH, 64, 128), dtype=np.float32)  # [B, T, F]


@functools.cache
def run(shape: tuple[int, int], fsdp: bool = True, micro_batches: int = 1):
    """STEPS sharded steps from the same seed and data; (losses, host params, step, state, shardings)."""
    mesh, rules, ssl, tx = make(small_cfg(shape, fsdp))
    state, shardings = sharded.init_state(ssl, tx, jax.random.key(0), mesh, rules)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    step = sharded.jit_step(ssl, tx, mesh, rules, shardings, batch_sharding, micro_batches=micro_batches)
    spec = jax.device_put(spec_batch(), batch_sharding)
    keys = [
        jax.device_put(jax.random.fold_in(jax.random.key(1), i), mesh_lib.replicated(mesh))
        for i in range(STEPS)
    ]
    losses = []
    with jax.transfer_guard("disallow"):  # as in the job's loop: no implicit host <-> device copies
        for key in keys:
            state, metrics = step(state, spec, key)
            losses.append(metrics["loss"])
    return np.array(jax.device_get(losses)), jax.device_get(state.params), step, state, shardings


def assert_same_run(a, b):
    np.testing.assert_allclose(a[0], b[0], rtol=LOSS_RTOL)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=PARAM_TOL, atol=PARAM_TOL), a[1], b[1])


# ----------------------------------------------------------------------------------------------------
# Mesh and rules from config (nothing compiles)


def test_mesh_from_config_resolves_the_rest_and_names_axis_types():
    cfg = small_cfg()
    cfg.mesh.shape.data, cfg.mesh.shape.fsdp = -1, 2
    mesh = mesh_lib.make_mesh(cfg)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    assert jax.config.jax_threefry_partitionable
    cfg.mesh.axis_types.fsdp = "explicit"  # the models' sharding constraints would become assertions
    with pytest.raises(ValueError, match=r"mesh.axis_types .*expected one of \['auto'\].*'fsdp': 'explicit'"):
        mesh_lib.make_mesh(cfg)
    assert mesh_lib.batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"))


@pytest.mark.parametrize(
    "shape, found",
    [
        ({"data": 3, "fsdp": 2}, "= 6 devices"),
        ({"data": -1, "fsdp": -1}, "at most one -1"),
        ({"data": 0, "fsdp": -1}, "positive"),
        ({"data": -1, "fsdp": 3}, "not a whole number"),
    ],
)
def test_bad_mesh_shape_is_refused(shape, found):
    cfg = small_cfg()
    cfg.mesh.shape = ml_collections.ConfigDict(shape)
    with pytest.raises(ValueError, match="config mesh.shape") as err:
        mesh_lib.make_mesh(cfg)
    assert found in str(err.value)


def test_mesh_axes_and_axis_types_must_be_named():
    cfg = small_cfg((-1, 1))
    cfg.mesh.axis_types = ml_collections.ConfigDict({"data": "auto"})
    with pytest.raises(ValueError, match=r"mesh.axis_types .*expected exactly the axes \['data', 'fsdp'\]"):
        mesh_lib.make_mesh(cfg)
    cfg.mesh.axis_types = ml_collections.ConfigDict({"data": "auto", "fsdp": "manual"})
    with pytest.raises(ValueError, match=r"mesh.axis_types .*found \{'fsdp': 'manual'\}"):
        mesh_lib.make_mesh(cfg)
    del cfg["mesh"]
    with pytest.raises(ValueError, match="expected a 'mesh' section"):
        mesh_lib.make_mesh(cfg)


def test_logical_rules_from_config():
    cfg = small_cfg()
    rules = mesh_lib.logical_rules(cfg)
    assert rules[0] == ("batch", ("data", "fsdp")) and ("embed", "fsdp") in rules
    cfg.mesh.rules = [["batch", ["data", "fsdp"]], ["embed", None]]  # as read back from config.json
    assert mesh_lib.logical_rules(cfg) == (("batch", ("data", "fsdp")), ("embed", None))


@pytest.mark.parametrize(
    "rules, found",
    [
        ((("embed", "model"),), "names ['model']"),
        ((("embed",),), "entry 0"),
        (((1, "fsdp"),), "entry 0"),
        ((), "non-empty"),
        ((("embed", ("fsdp", 2)),), "entry 0"),
    ],
)
def test_bad_rules_are_refused(rules, found):
    cfg = small_cfg()
    cfg.mesh.rules = rules
    with pytest.raises(ValueError, match="config mesh.rules") as err:
        mesh_lib.logical_rules(cfg)
    assert found in str(err.value)


def test_rule_for_a_name_the_models_do_not_use_is_refused():
    cfg = small_cfg((4, 2))
    cfg.mesh.rules = cfg.mesh.rules + (("embd", "fsdp"),)  # a typo would silently replicate
    mesh, rules, ssl, tx = make(cfg)
    with pytest.raises(ValueError, match=r"mesh.rules .*found \['embd'\]"):
        sharded.state_shardings(ssl, tx, mesh, rules)


def test_batch_not_divisible_over_the_mesh_is_refused_when_the_mesh_is_made():
    cfg = small_cfg((4, 2))
    cfg.data.global_batch_size = 12
    with pytest.raises(ValueError, match=r"data.global_batch_size .*data x fsdp = \{'data': 4, 'fsdp': 2\}"):
        make(cfg)
    cfg.data.global_batch_size, cfg.train.micro_batches = 8, 2  # 8 devices x 2 micro-batches
    with pytest.raises(ValueError, match="train.micro_batches = 2, found 8 clips"):
        make(cfg)


def test_batch_not_divisible_is_refused_by_the_step_before_compiling():
    mesh, rules, ssl, tx = make(small_cfg((4, 2)))
    shardings = sharded.state_shardings(ssl, tx, mesh, rules)
    abstract, _ = sharded.abstract_state(ssl, tx, mesh, rules)
    step = sharded.jit_step(ssl, tx, mesh, rules, shardings, mesh_lib.batch_sharding(mesh), micro_batches=2)
    spec = jax.ShapeDtypeStruct((8, 64, 128), np.float32)  # 8 clips: not 8 devices x 2 micro-batches
    with pytest.raises(ValueError, match=r"micro_batches = 2 clips, found spec \(8, 64, 128\)"):
        step(abstract, spec, jax.random.key(0))
    with pytest.raises(ValueError, match="data.global_batch_size"):
        step.lower(abstract, spec, jax.random.key(0))
    assert step._cache_size() == 0  # refused before tracing or compiling


# ----------------------------------------------------------------------------------------------------
# Shardings of the state (nothing or only the init compiles)


def test_fsdp_rules_shard_params_teacher_and_optimizer_state():
    mesh, rules, ssl, tx = make(small_cfg((4, 2)))
    shardings = sharded.state_shardings(ssl, tx, mesh, rules)
    qkv = ("encoder", "blocks_0", "attn", "qkv", "kernel")  # [embed, qkv, heads, kv]
    get = lambda tree: functools.reduce(lambda t, k: t[k], qkv[1:], tree[qkv[0]])  # noqa: E731
    assert get(shardings.params).spec == PartitionSpec("fsdp", None, None, None)
    adam = shardings.opt_state[0]  # ScaleByAdamState(count, mu, nu)
    assert get(adam.mu).spec == get(adam.nu).spec == get(shardings.params).spec
    assert adam.count.spec == PartitionSpec() and shardings.step.spec == PartitionSpec()
    assert shardings.teacher_params == shardings.params["encoder"]
    off = sharded.state_shardings(ssl, tx, *make(small_cfg((4, 2), fsdp=False))[:2])
    assert all(s.spec == PartitionSpec() or set(s.spec) == {None} for s in jax.tree.leaves(off.params))


def test_dimension_that_does_not_divide_stays_whole():
    cfg = small_cfg((4, 2))
    cfg.mesh.rules = (("batch", ("data", "fsdp")), ("qkv", "fsdp"), ("kv", "fsdp"))
    mesh, rules, ssl, tx = make(cfg)
    attn = sharded.param_shardings(ssl, mesh, rules)["encoder"]["blocks_0"]["attn"]
    # qkv kernel [embed 64, qkv 3, heads 4, kv 16]: the rule gives qkv (3) fsdp = 2, which does not divide.
    assert attn["qkv"]["kernel"].spec == PartitionSpec(None, None, None, None)
    assert attn["gate"]["kernel"].spec == PartitionSpec(None, None, "fsdp")  # [embed, heads, kv 16]


@pytest.mark.slow
def test_init_state_is_created_sharded_and_abstract_state_matches():
    mesh, rules, ssl, tx = make(small_cfg((4, 2)))
    state, shardings = sharded.init_state(ssl, tx, jax.random.key(0), mesh, rules)
    abstract, abstract_shardings = sharded.abstract_state(ssl, tx, mesh, rules)
    assert abstract_shardings == shardings
    jax.tree.map(lambda a, s: (a.sharding == s) or pytest.fail(f"{a.sharding} != {s}"), state, shardings)
    jax.tree.map(
        lambda a, x: (a.shape, a.dtype, a.sharding) == (x.shape, x.dtype, x.sharding) or pytest.fail(str(a)),
        abstract,
        state,
    )
    kernel = state.params["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (32, 3, 4, 16)  # embed 64 over fsdp = 2
    teacher = state.teacher_params["blocks_0"]["attn"]["qkv"]["kernel"]
    np.testing.assert_array_equal(teacher, kernel)  # the teacher starts as the student encoder ...
    pointers = lambda a: {s.data.unsafe_buffer_pointer() for s in a.addressable_shards}  # noqa: E731
    assert not pointers(teacher) & pointers(kernel)  # ... in its own buffers (the state is donated)
    # The same numbers as on one device (partitionable threefry): sharding changes the layout only.
    one, _ = sharded.init_state(ssl, tx, jax.random.key(0), *make(small_cfg((1, 1)))[:2])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(one.params), jax.device_get(state.params))


# ----------------------------------------------------------------------------------------------------
# The jitted step (each run compiles: ~30 s on the 2 shared cores)


@pytest.mark.slow
def test_one_device_and_4x2_mesh_give_the_same_losses():
    one, mesh = run((1, 1)), run((4, 2))
    assert np.all(np.isfinite(one[0])) and len(set(one[0].tolist())) == STEPS  # the loss moves
    assert_same_run(one, mesh)


@pytest.mark.slow
def test_fsdp_on_and_off_agree():
    on, off = run((4, 2)), run((4, 2), fsdp=False)
    kernel = lambda r: r[3].params["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"]  # noqa: E731
    assert kernel(on).sharding.spec == PartitionSpec("fsdp", None)
    assert set(kernel(off).sharding.spec) <= {None}
    assert_same_run(on, off)


@pytest.mark.slow
def test_jit_cache_holds_one_entry_and_state_keeps_its_shardings():
    losses, _, step, state, shardings = run((4, 2))
    assert step._cache_size() == 1, (
        f"expected one compilation after {STEPS} steps, found {step._cache_size()}"
    )
    jax.tree.map(lambda a, s: (a.sharding == s) or pytest.fail(f"{a.sharding} != {s}"), state, shardings)


@pytest.mark.slow
def test_two_micro_batches_equal_one_batch():
    one, two = run((4, 2)), run((4, 2), micro_batches=2)
    assert two[2]._cache_size() == 1
    assert_same_run(one, two)


def test_micro_batches_are_strided_so_each_device_keeps_its_rows():
    from bat_jax.train.step import micro_split

    x = np.arange(8)[:, None] * np.ones((1, 3))  # [8, 3]
    parts = np.asarray(micro_split(x, 2))  # [2, 4, 3]
    np.testing.assert_array_equal(parts[:, :, 0], [[0, 2, 4, 6], [1, 3, 5, 7]])
    with pytest.raises(ValueError, match="micro_batches=3, found 8 rows"):
        micro_split(x, 3)


@pytest.mark.parametrize("name", ["bat_base", "bat_small", "eat_style", "tiny"])
def test_every_pretrain_config_has_a_mesh_and_rules_the_models_use(name):
    cfg = train_config.pretrain_config(name)
    mesh = mesh_lib.make_mesh(cfg)  # data = -1: every device; the config's batch divides over 8
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1} and mesh_lib.micro_batches(cfg) == 1
    shardings = sharded.state_shardings(
        train_config.ssl_config(cfg), train_config.optimizer(cfg), mesh, mesh_lib.logical_rules(cfg)
    )
    assert jax.tree.leaves(shardings.params)
