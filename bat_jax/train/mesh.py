"""The device mesh and the logical-axis rules of a pretraining run, from the config's ``mesh`` section.

    from bat_jax.train import mesh as mesh_lib
    mesh = mesh_lib.make_mesh(cfg)                  # cfg.mesh.shape {data, fsdp}, -1 = the rest
    rules = mesh_lib.logical_rules(cfg)             # cfg.mesh.rules: ((logical name, mesh axes), ...)
    batch_sharding = mesh_lib.batch_sharding(mesh)  # the batch dimension over ("data", "fsdp")

The config section (configs/pretrain/bat_base.py)::

    mesh.shape      = {"data": -1, "fsdp": 1}          # devices per axis; one axis may be -1 (the rest)
    mesh.axis_types = {"data": "auto", "fsdp": "auto"} # jax.sharding.AxisType per axis, always given
    mesh.rules      = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ...)

The rules map the models' logical names (bat_jax/models/layers.py: ``batch``, ``length``, ``embed``, ``mlp``,
``qkv``, ``heads``, ``kv``) to mesh axes, first match first (flax's ``logical_axis_rules``): ``batch`` comes
first so activations [batch, length, embed] take ("data", "fsdp") for the batch and leave ``embed`` whole,
while parameters (which have no batch axis) get ``embed`` over ``fsdp``: FSDP. ``("embed", None)``
replicates the parameters instead.

Axis types: `jax.make_mesh` defaults to Explicit axes (jax >= 0.9), `jax.sharding.Mesh` to Auto (PITFALLS.md);
the config names them so that an AOT compile and a live run build the same mesh. The models rely on the
compiler to place the FSDP all-gathers (sharding constraints on logical names), which is the Auto mode;
"explicit" is refused (measured: the 4x2 FSDP step fails under Explicit axes, see `axis_types`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

_WHERE = "bat_jax/train/mesh.py"
AXES = ("data", "fsdp")  # the mesh axes, in this order (data outermost)
BATCH_AXES = AXES  # the global batch is split over all of them
AXIS_TYPES = {"auto": AxisType.Auto}  # the one kind the models run under (see axis_types)
Rules = tuple[tuple[str, Any], ...]


def configure() -> None:
    """Process-wide JAX settings of a pretraining run: random bits that do not depend on the sharding
    (`jax_threefry_partitionable`: a 1-device and an 8-device run draw the same masks and weights)."""
    jax.config.update("jax_threefry_partitionable", True)


def _section(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    if "mesh" not in cfg:
        raise ValueError(
            f"config ({_WHERE}): expected a 'mesh' section (shape, axis_types, rules; see "
            f"configs/pretrain/bat_base.py), found the sections {sorted(cfg.keys())}"
        )
    return cfg.mesh


def _per_axis(mesh_cfg: Mapping[str, Any], key: str) -> dict[str, Any]:
    """cfg.mesh.<key> as {axis: value} with exactly the axes AXES, or a ValueError naming the key."""
    given = dict(mesh_cfg.get(key) or {})
    if set(given) != set(AXES):
        raise ValueError(
            f"config mesh.{key} ({_WHERE}): expected exactly the axes {list(AXES)}, found {sorted(given)}"
        )
    return given


def mesh_shape(cfg: ml_collections.ConfigDict, device_count: int | None = None) -> tuple[int, ...]:
    """cfg.mesh.shape resolved for ``device_count`` devices (default: all): (data, fsdp), a -1 replaced by
    the devices the other axes leave."""
    devices = jax.device_count() if device_count is None else int(device_count)
    given = _per_axis(_section(cfg), "shape")
    sizes = [given[axis] for axis in AXES]
    rest = [axis for axis in AXES if given[axis] == -1]
    bad = [
        a for a, s in given.items() if isinstance(s, bool) or not isinstance(s, int) or s in (0,) or s < -1
    ]
    if bad or len(rest) > 1:
        raise ValueError(
            f"config mesh.shape ({_WHERE}): expected positive sizes with at most one -1 (the rest of the "
            f"devices), found {dict(given)}"
        )
    fixed = math.prod(s for s in sizes if s != -1)
    if rest:
        if devices % fixed:
            raise ValueError(
                f"config mesh.shape ({_WHERE}): {dict(given)} leaves {devices} / {fixed} devices for "
                f"{rest[0]!r}, which is not a whole number ({devices} devices)"
            )
        sizes = [devices // fixed if s == -1 else s for s in sizes]
    if math.prod(sizes) != devices:
        raise ValueError(
            f"config mesh.shape ({_WHERE}): expected data x fsdp = {devices} (the devices), found "
            f"{dict(zip(AXES, sizes, strict=True))} = {math.prod(sizes)} devices"
        )
    return tuple(sizes)


def axis_types(cfg: ml_collections.ConfigDict) -> tuple[AxisType, ...]:
    """cfg.mesh.axis_types ({axis: "auto"}) as jax AxisTypes, in the order of AXES. "explicit" is refused:
    under Explicit axes the models' logical sharding constraints act as assertions (jax: "with_sharding_
    constraint acts as an assert when all axes of mesh are of type Explicit") and the FSDP step fails."""
    given = _per_axis(_section(cfg), "axis_types")
    bad = {axis: kind for axis, kind in given.items() if kind not in AXIS_TYPES}
    if bad:
        raise ValueError(
            f"config mesh.axis_types ({_WHERE}): expected one of {sorted(AXIS_TYPES)} per axis, found {bad}"
            " (Explicit axes would turn the models' sharding constraints into assertions)"
        )
    return tuple(AXIS_TYPES[given[axis]] for axis in AXES)


def check_global_batch(cfg: ml_collections.ConfigDict, mesh: Mesh, micro_batches: int = 1) -> int:
    """cfg.data.global_batch_size split over the mesh's data x fsdp devices and ``micro_batches``: the clips
    per device and micro-batch, or a ValueError saying which does not divide (before anything compiles)."""
    batch = int(cfg.data.global_batch_size)
    shards = batch_shards(mesh)
    if micro_batches < 1 or batch % (shards * micro_batches):
        raise ValueError(
            f"config data.global_batch_size ({_WHERE}): expected a multiple of the mesh's data x fsdp = "
            f"{dict(mesh.shape)} = {shards} devices times train.micro_batches = {micro_batches}, found "
            f"{batch} clips"
        )
    return batch // (shards * micro_batches)


def make_mesh(cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp) mesh of cfg.mesh over ``devices`` (default: all), its axis types from the config.
    Also calls `configure` and checks that cfg.data.global_batch_size divides over the mesh (and over
    cfg.train.micro_batches when the config has it)."""
    configure()
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(cfg, len(devices))
    try:
        mesh = jax.make_mesh(shape, AXES, axis_types=axis_types(cfg), devices=devices)
    except NotImplementedError:
        # a TPU slice whose physical axes no mesh axis is a product of (fsdp 8 on a 4x4x4 v5p): JAX lays
        # the mesh out when it may split a physical axis between two mesh axes
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        mesh = Mesh(grid, AXES, axis_types=axis_types(cfg))
    if "data" in cfg and "global_batch_size" in cfg.data:
        check_global_batch(cfg, mesh, micro_batches(cfg))
    return mesh


def micro_batches(cfg: ml_collections.ConfigDict) -> int:
    """cfg.train.micro_batches (gradient accumulation steps per update), 1 when the config has none."""
    value = cfg.train.get("micro_batches", 1) if "train" in cfg else 1
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"config train.micro_batches ({_WHERE}): expected an integer >= 1, found {value!r}")
    return value


def _mesh_axes(value: Any) -> str | tuple[str, ...] | None:
    """A rule's right-hand side: None, an axis name, or several (JSON turns the tuple into a list)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError(value)


def logical_rules(cfg: ml_collections.ConfigDict) -> Rules:
    """cfg.mesh.rules as a tuple of (logical name, mesh axes) pairs for `flax.linen.logical_axis_rules`;
    every mesh axis named must be one of AXES."""
    given = _section(cfg).get("rules")
    where = f"config mesh.rules ({_WHERE})"
    if not isinstance(given, Sequence) or isinstance(given, str) or not given:
        raise ValueError(
            f"{where}: expected a non-empty sequence of (logical name, mesh axes), found {given!r}"
        )
    rules = []
    for i, rule in enumerate(given):
        try:
            name, axes = rule
            if not isinstance(name, str):
                raise TypeError(name)
            axes = _mesh_axes(axes)
        except (TypeError, ValueError):
            raise ValueError(
                f"{where}: expected entry {i} to be (logical name, None | axis | (axes...)), found {rule!r}"
            ) from None
        unknown = sorted(set((axes,) if isinstance(axes, str) else axes or ()) - set(AXES))
        if unknown:
            raise ValueError(
                f"{where}: entry {i} {rule!r} names {unknown}, expected mesh axes among {list(AXES)}"
            )
        rules.append((name, axes))
    return tuple(rules)


def batch_shards(mesh: Mesh) -> int:
    """How many pieces the batch dimension is split into: the product of the BATCH_AXES sizes."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The batch dimension over ("data", "fsdp"), the other dimensions whole (any rank)."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
