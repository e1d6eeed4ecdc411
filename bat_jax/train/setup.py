"""The pieces of a pretraining run before its loop: config checks, mesh, state, compiled step, init_from.

`check_config` fails before anything compiles, naming the field (``ConfigError``, a ValueError).
`build` returns a `Job`: the mesh and the batch's sharding, the state's initialiser and abstract form (for a
restore onto any mesh), the compiled step, the model FLOPs of one update (``flops_per_step``, analytic) and
the device peak (``peak``, from config, a table or measured once; bat_jax/train/flops.py), so that the loop
gets the MFU of a window of steps as ``job.mfu(step_time_s)`` with no extra compile. The sharded path
(bat_jax/train/mesh.py, sharded.py) is used when the config has a ``mesh`` section; without one the run is on
one device (train/step.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bat_jax.models.encoder import param_count
from bat_jax.train import checkpoint as ckpt
from bat_jax.train import config as config_lib
from bat_jax.train import flops as flops_lib
from bat_jax.train import hostmem
from bat_jax.train import step as step_lib

_WHERE = "bat_jax/train/setup.py"
# train.* keys the job reads, with the checks they get (the contract keys are required in the config).
POSITIVE_TRAIN_KEYS = ("steps", "checkpoint_every", "log_every", "keep")


class ConfigError(ValueError):
    """A config value the job cannot run with; the message names the field."""


def _fail(field: str, expected: str, found: Any) -> None:
    raise ConfigError(f"config {field} ({_WHERE}): expected {expected}, found {found!r}")


def _manifest(root: Path) -> dict | None:
    path = root / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def check_data(cfg: ml_collections.ConfigDict) -> None:
    """data.root is a prepared folder holding data.split, prepared at cfg.frames frames per clip."""
    root = Path(cfg.data.root)
    if not root.is_dir():
        _fail("data.root", "a folder written by `bat-jax prepare`", str(root) + " (no such folder)")
    manifest = _manifest(root)
    if manifest is None:
        if not list((root / cfg.data.split).glob("*.arrayrecord")):
            _fail("data.split", f"a split with shards under {root}", cfg.data.split)
        return
    splits = sorted(manifest.get("splits", {}))
    if cfg.data.split not in splits:
        _fail("data.split", f"one of the splits of {root / 'manifest.json'}: {splits}", cfg.data.split)
    prepared = manifest.get("clip", {}).get("frames")
    if prepared is not None and int(prepared) != int(cfg.frames):
        _fail(
            "frames",
            f"the frames per clip {root} was prepared at ({prepared}, manifest.json clip.frames); prepare "
            f"again with --clip-seconds for {cfg.frames} frames, or pass --config.frames={prepared}",
            cfg.frames,
        )


def check_config(cfg: ml_collections.ConfigDict) -> None:
    """Every check that needs no compile: train keys, frames vs the patch, the batch over the devices and
    the views, the data folder. Raises ConfigError naming the field."""
    for key in POSITIVE_TRAIN_KEYS:
        value = cfg.train.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(f"train.{key}", "an integer >= 1", value)
    keep_every = cfg.train.get("keep_every")
    if isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 0:
        _fail("train.keep_every", "an integer >= 0 (0: keep only the last train.keep)", keep_every)
    warmup = cfg.optim.get("warmup_steps")
    if isinstance(warmup, int) and not 0 <= warmup < cfg.train.steps:
        _fail("optim.warmup_steps", f"0 <= warmup_steps < train.steps = {cfg.train.steps}", warmup)
    try:
        encoder = config_lib.encoder_config(cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    patch_t = encoder.patch_size[0]
    if int(cfg.frames) % patch_t:
        expected = f"a multiple of the encoder's time patch size {patch_t} (encoder.patch_size)"
        _fail("frames", expected, cfg.frames)
    try:
        config_lib.ssl_config(cfg), config_lib.optimizer(cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    try:
        flops_lib.configured_peak(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    batch, devices = int(cfg.data.global_batch_size), _batch_devices(cfg)
    if batch % devices:
        _fail("data.global_batch_size", f"a multiple of the {devices} devices the batch is split over", batch)
    check_data(cfg)


def _batch_devices(cfg) -> int:
    if "mesh" in cfg:
        from bat_jax.train import mesh as mesh_lib

        return math.prod(mesh_lib.mesh_shape(cfg))
    return 1


@dataclasses.dataclass
class Job:
    cfg: ml_collections.ConfigDict
    mesh: Mesh
    batch_sharding: NamedSharding
    replicated: NamedSharding
    init_state: Callable[[], step_lib.TrainState]
    abstract_state: Callable[[], step_lib.TrainState]
    jit_step: Callable[[], Callable]
    flops_per_step: float = 0.0  # model FLOPs of one update on the global batch (flops.step_flops)

    @functools.cached_property
    def peak(self) -> flops_lib.Peak:
        """Peak FLOP/s of one device and its source (flops.peak_flops), worked out (measured, if need be)
        once, on first use."""
        return flops_lib.peak_flops(self.cfg, list(self.mesh.devices.flat))

    def mfu(self, step_time_s: float) -> float:
        """Model FLOPs utilisation of a step taking ``step_time_s`` seconds, against the peak of all the
        mesh's devices (flops.peak_devices: simulated CPU devices count once per process)."""
        devices = flops_lib.peak_devices(self.mesh.devices.flat)
        return flops_lib.mfu(self.flops_per_step, step_time_s, self.peak.flops_per_s, devices)

    def abstract_tree(self) -> dict[str, Any]:
        return ckpt.abstract_tree(self.abstract_state(), self.replicated)

    def compile(self, state, rng, loader):
        """(the compiled step, its memory analysis or None): compiled ahead for the loader's batch."""
        mels = loader.num_mels if hasattr(loader, "num_mels") else config_lib.encoder_config(self.cfg).n_mels
        spec = jax.ShapeDtypeStruct(
            (int(self.cfg.data.global_batch_size), int(self.cfg.frames), mels), jnp.float32,
            sharding=self.batch_sharding,
        )  # fmt: skip
        key = jax.eval_shape(lambda: jax.random.key(0))
        key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=self.replicated)
        compiled = self.jit_step().lower(state, spec, key).compile()
        try:
            memory = compiled.memory_analysis()
        except Exception:  # noqa: BLE001 - some backends have none; the first line then says so
            memory = None
        return compiled, memory

    def describe(self, state, memory) -> str:
        """The run's first line: mesh, devices, per-device batch, parameter count, compiled memory, model
        FLOPs per step and the device peak the MFU is taken against (with its source)."""
        devices = self.mesh.devices.size
        axes = self.batch_sharding.spec[0] if self.batch_sharding.spec else ()
        axes = (axes,) if isinstance(axes, str) else axes or ()
        per_device = int(self.cfg.data.global_batch_size) // math.prod(self.mesh.shape[a] for a in axes)
        student, encoder = param_count(state.params), param_count(state.params["encoder"])
        peak, peaks = self.peak, flops_lib.peak_devices(self.mesh.devices.flat)
        mem = "n/a"
        if memory is not None:
            total = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
            total -= memory.alias_size_in_bytes
            mem = f"{total / 2**20:.1f} MiB per device"
        return (
            f"bat-jax pretrain: mesh {dict(self.mesh.shape)}, {devices} {jax.devices()[0].platform} devices, "
            f"{per_device} clips x {self.cfg.ssl.num_views} views per device, {student:,} student parameters "
            f"({encoder:,} encoder), compiled step memory {mem}, {self.flops_per_step:.3g} model FLOPs per "
            f"step, MFU against {peaks} x {peak.flops_per_s:.3g} FLOP/s ({peak.source})"
            + (f", host malloc: {hostmem.active()}" if jax.devices()[0].platform == "cpu" else "")
        )


def build(cfg: ml_collections.ConfigDict) -> Job:
    """The run's Job: sharded over cfg.mesh when the config has one, else on the first device."""
    ssl, tx = config_lib.ssl_config(cfg), config_lib.optimizer(cfg)
    rng = jax.random.key(int(cfg.train.seed))
    flops_per_step = flops_lib.step_flops(ssl, int(cfg.data.global_batch_size))
    if "mesh" in cfg:
        return _sharded_job(cfg, ssl, tx, rng, flops_per_step)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1), ("data",))
    one = NamedSharding(mesh, PartitionSpec())

    def init():
        return jax.device_put(step_lib.init_train_state(ssl, tx, rng), one)

    def abstract():
        shapes = jax.eval_shape(lambda: step_lib.init_train_state(ssl, tx, rng))
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), shapes)

    return Job(
        cfg, mesh, NamedSharding(mesh, PartitionSpec("data")), one, init, abstract,
        lambda: step_lib.jit_train_step(ssl, tx), flops_per_step,
    )  # fmt: skip


def _sharded_job(cfg, ssl, tx, rng, flops_per_step) -> Job:
    from bat_jax.train import mesh as mesh_lib
    from bat_jax.train import sharded

    mesh, rules = mesh_lib.make_mesh(cfg), mesh_lib.logical_rules(cfg)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    shardings = {}

    def init():
        state, shardings["state"] = sharded.init_state(ssl, tx, rng, mesh, rules)
        return state

    def abstract():
        state, shardings["state"] = sharded.abstract_state(ssl, tx, mesh, rules)
        return state

    def jit_step():
        if "state" not in shardings:
            abstract()
        micro = mesh_lib.micro_batches(cfg)
        return sharded.jit_step(ssl, tx, mesh, rules, shardings["state"], batch_sharding, micro_batches=micro)

    replicated = mesh_lib.replicated(mesh)
    return Job(cfg, mesh, batch_sharding, replicated, init, abstract, jit_step, flops_per_step)


def init_from(state: step_lib.TrainState, source: str, job: Job, say) -> step_lib.TrainState:
    """Student and teacher encoders from ``source`` (anything `bat_jax.load_encoder` reads); from a
    pretraining workdir also the decoder of the same checkpoint when its shapes equal the config's (else it
    stays fresh, and the message says why). The optimizer state stays fresh, the step 0. ConfigError naming
    train.init_from when the source cannot be read or its encoder does not fit the config's."""
    from bat_jax.convert import workdir
    from bat_jax.convert.errors import CheckpointError
    from bat_jax.convert.load import load_weights

    path = Path(source)
    try:
        step = workdir.resolve_step(path) if workdir.is_workdir(path) else None
        _, params, kind = load_weights(path, step=step)
    except (CheckpointError, FileNotFoundError, ImportError, ValueError) as e:
        raise ConfigError(
            f"config train.init_from ({_WHERE}): expected a checkpoint that bat_jax.load_encoder reads, "
            f"but {source} could not be read: {e}"
        ) from e
    diff = _shape_diff(state.params["encoder"], params)
    if diff:
        raise ConfigError(
            f"config train.init_from ({_WHERE}): expected an encoder checkpoint whose shapes fit the "
            f"config's encoder, found {source} with {diff}"
        )
    place = lambda new, old: jax.device_put(np.asarray(new, old.dtype), old.sharding)  # noqa: E731
    encoder = jax.tree.map(place, params, state.params["encoder"])
    teacher = jax.tree.map(jnp.copy, encoder)
    decoder = state.params["decoder"]
    if kind != "workdir":
        loaded = "student and teacher encoders loaded, decoder fresh"
    else:
        decoder, why = _workdir_decoder(path, step, decoder, place)
        if why is None:
            loaded = f"student and teacher encoders and the decoder loaded from {path} step {step}"
        else:
            loaded = f"student and teacher encoders loaded from {path} step {step}, decoder fresh: {why}"
    say(f"init_from {source} ({kind}): {loaded}; optimizer state fresh, step 0")
    params = {**state.params, "encoder": encoder, "decoder": decoder}
    return state.replace(params=params, teacher_params=teacher, opt_state=state.opt_state)


def _workdir_decoder(path: Path, step: int, fresh, place) -> tuple[Any, str | None]:
    """(the workdir's decoder at ``step`` placed as ``fresh``, None), or (``fresh``, why not)."""
    from bat_jax.convert import workdir
    from bat_jax.convert.errors import CheckpointError

    try:
        _, theirs = workdir.load_workdir_decoder(path, step=step)
    except CheckpointError as e:
        return fresh, f"its decoder could not be read ({e})"
    diff = _shape_diff(fresh, theirs)
    if diff:
        return fresh, f"its shapes do not fit the config's decoder ({diff})"
    return jax.tree.map(place, theirs, fresh), None


def _shape_diff(ours, theirs, most: int = 5) -> str:
    """The first ``most`` differences between two trees' shapes, "" when none: ``a/b/c: config (16,) vs
    checkpoint (8,)``, or a key only one of them has, joined with "; "."""
    tuples = lambda x: isinstance(x, tuple)  # noqa: E731
    flat = [
        {_path(k): v for k, v in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=tuples)[0]}
        for shapes in (jax.tree.map(lambda x: tuple(np.shape(x)), t) for t in (ours, theirs))
    ]
    diff = []
    for key in sorted(set(flat[0]) | set(flat[1])):
        a, b = flat[0].get(key), flat[1].get(key)
        if a is None:
            diff.append(f"{key}: in the checkpoint, not in the config")
        elif b is None:
            diff.append(f"{key}: in the config, not in the checkpoint")
        elif a != b:
            diff.append(f"{key}: config {a} vs checkpoint {b}")
    more = f"; and {len(diff) - most} more" if len(diff) > most else ""
    return "; ".join(diff[:most]) + more


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keys)
