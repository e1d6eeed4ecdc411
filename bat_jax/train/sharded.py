"""The pretraining state and step over a device mesh: created already sharded, jitted with explicit shardings.

    from bat_jax.train import mesh as mesh_lib, sharded
    mesh, rules = mesh_lib.make_mesh(cfg), mesh_lib.logical_rules(cfg)
    state, shardings = sharded.init_state(ssl, tx, rng, mesh, rules)   # jit(init, out_shardings=...)
    step = sharded.jit_step(ssl, tx, mesh, rules, shardings, mesh_lib.batch_sharding(mesh), micro_batches=1)
    state, metrics = step(state, spec, key)     # spec [B, T, F] on batch_sharding, key replicated

Parameter shardings come from the models' logical axis names (`nn.with_logical_partitioning`) through the
rules table; a dimension that does not divide over its mesh axes stays whole (big_vision's FSDP rule also
shards only divisible dimensions). The EMA teacher takes the student encoder's shardings, the optimizer
state its parameters' (`optax.tree_map_params`), counters are replicated. The jitted step has explicit
in / out shardings, out = in for the donated state (jax #25346) and replicated metrics: global values, the
same as on one device up to float32 summation order (``grad_norm`` is the norm of the whole, possibly
FSDP-sharded, gradient; tests/train/test_observability.py checks 1 device against 4x2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bat_jax.models.layers import ACT_HEADS, ACT_MLP, ACT_TOKENS
from bat_jax.models.ssl_objective import SSLConfig, abstract_params, init_params
from bat_jax.train import mesh as mesh_lib
from bat_jax.train.step import TrainState, create_train_state, train_step

_WHERE = "bat_jax/train/sharded.py"
Array = jax.Array
PyTree = Any
Rules = mesh_lib.Rules
ACTIVATION_NAMES = frozenset(ACT_TOKENS + ACT_HEADS + ACT_MLP)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _plain(boxed: PyTree) -> PyTree:
    """Values of boxed parameters without applying their sharding constraints (the out_shardings do)."""
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if _is_box(x) else x, boxed, is_leaf=_is_box
    )


def logical_names(boxed: PyTree) -> set[str]:
    """Every logical axis name the (boxed) parameters use."""
    specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, PartitionSpec))
    return {name for spec in specs for name in spec if isinstance(name, str)}


def check_rules(rules: Rules, boxed: PyTree) -> None:
    """A rule for a name that neither the parameters nor the activations use is a typo: refuse it."""
    known = logical_names(boxed) | ACTIVATION_NAMES
    unknown = sorted({name for name, _ in rules} - known)
    if unknown:
        raise ValueError(
            f"config mesh.rules ({_WHERE}): expected logical names among {sorted(known)}, found {unknown}"
        )


def _fit(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """``sharding`` with every dimension that does not divide over its mesh axes left whole."""
    mesh, spec = sharding.mesh, tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))

    def fits(axes: Any, size: int) -> bool:
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        return size % math.prod(mesh.shape[a] for a in axes) == 0

    return NamedSharding(
        mesh, PartitionSpec(*(a if fits(a, n) else None for a, n in zip(spec, shape, strict=True)))
    )


def param_shardings(config: SSLConfig, mesh: Mesh, rules: Rules) -> PyTree:
    """NamedSharding of every student parameter {"encoder", "decoder"} (plain tree), from the rules."""
    boxed = abstract_params(config)
    check_rules(rules, boxed)
    logical = nn.get_partition_spec(boxed)
    shardings = nn.logical_to_mesh_sharding(logical, mesh, rules)
    return jax.tree.map(lambda s, a: _fit(s, a.shape), shardings, _plain(boxed))


def state_shardings(
    config: SSLConfig, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules
) -> TrainState:
    """A TrainState of NamedShardings: parameters by the rules, the teacher as the student encoder, the
    optimizer state as its parameters, the step and the optimizer's counters replicated."""
    params = param_shardings(config, mesh, rules)
    replicated = mesh_lib.replicated(mesh)
    plain = _plain(abstract_params(config))
    opt_state = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        jax.eval_shape(tx.init, plain),
        params,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(step=replicated, params=params, teacher_params=params["encoder"], opt_state=opt_state)


def _init_fn(config: SSLConfig, tx: optax.GradientTransformation) -> Callable[[Array], TrainState]:
    def init(key: Array) -> TrainState:
        return create_train_state(_plain(init_params(config, key)), tx)

    return init


def init_state(
    config: SSLConfig, tx: optax.GradientTransformation, rng: Array, mesh: Mesh, rules: Rules
) -> tuple[TrainState, TrainState]:
    """Step 0 (random student, teacher = a copy of its encoder) created on the mesh already sharded, and its
    shardings (a TrainState of NamedShardings)."""
    shardings = state_shardings(config, tx, mesh, rules)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(_init_fn(config, tx), out_shardings=shardings)(rng)
    return state, shardings


def abstract_state(
    config: SSLConfig, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules
) -> tuple[TrainState, TrainState]:
    """(ShapeDtypeStructs of the state, each with its sharding on ``mesh``; the shardings): the target of an
    Orbax restore onto any mesh. Allocates and compiles nothing."""
    shardings = state_shardings(config, tx, mesh, rules)
    shapes = jax.eval_shape(_init_fn(config, tx), jax.random.key(0))
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )
    return abstract, shardings


class ShardedStep:
    """``step(state, spec, key) -> (state, metrics)``: the jitted step run under its mesh and rules.

    ``spec`` [B, T, F] must be laid out as ``batch_sharding`` and ``key`` replicated (or committed to
    nothing); B is checked to divide over the mesh and the micro-batches before anything compiles."""

    def __init__(self, jitted: Any, mesh: Mesh, rules: Rules, micro_batches: int):
        self._jitted, self.mesh, self.rules, self.micro_batches = jitted, mesh, rules, micro_batches

    def _check(self, spec: Any) -> None:
        shards = mesh_lib.batch_shards(self.mesh)
        b = spec.shape[0]
        if b % (shards * self.micro_batches):
            raise ValueError(
                f"sharded step ({_WHERE}): expected a batch of a multiple of data x fsdp = "
                f"{dict(self.mesh.shape)} = {shards} devices times micro_batches = {self.micro_batches} "
                f"clips, found spec {tuple(spec.shape)} (config data.global_batch_size)"
            )

    def __call__(self, state: TrainState, spec: Array, key: Array) -> tuple[TrainState, dict[str, Array]]:
        self._check(spec)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self._jitted(state, spec, key)

    def lower(self, state: Any, spec: Any, key: Any) -> Any:
        """`jax.jit(...).lower` under the mesh and rules (arrays or ShapeDtypeStructs): for the compiled
        step's memory and cost analysis, or an AOT compile."""
        self._check(spec)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self._jitted.lower(state, spec, key)

    def _cache_size(self) -> int:
        return self._jitted._cache_size()


def jit_step(
    config: SSLConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Rules,
    state_shardings: TrainState,
    batch_sharding: NamedSharding,
    micro_batches: int = 1,
) -> Callable[[TrainState, Array, Array], tuple[TrainState, dict[str, Array]]]:
    """The train step (`bat_jax.train.step.train_step`) jitted over ``mesh``: in = (state_shardings,
    batch_sharding, replicated key), out = (state_shardings, replicated metrics), the state donated."""
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(
            f"jit_step ({_WHERE}): expected micro_batches an integer >= 1, found {micro_batches!r}"
        )
    replicated = mesh_lib.replicated(mesh)

    def step(state: TrainState, spec: Array, key: Array) -> tuple[TrainState, dict[str, Array]]:
        spec = nn.with_logical_constraint(spec, ("batch", None, None))  # [B, T, F]
        return train_step(state, spec, key, config, tx, micro_batches)

    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    return ShardedStep(jitted, mesh, rules, micro_batches)
