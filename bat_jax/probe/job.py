"""`run_probe(cfg, workdir)`: the probing job behind `bat-jax probe` (see bat_jax/probe/cli.py for the
workdir's contract).

Stages: config and inputs checked (probe names, optimizer, prepared folder, splits, front-end, labels) →
frozen encoder → for each evaluation (one, or one per fold): loaders → one jitted step for all probes and
sweep members → validation every `train.eval_every` updates (best figures kept) → test at the end →
metrics.json, gates.json (+ gates.png), the probe params (Orbax), metrics.jsonl and TensorBoard scalars.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bat_jax.data.pipeline import EvalLoader, PretrainLoader
from bat_jax.models import xla_options
from bat_jax.probe import cache as cache_lib
from bat_jax.probe import heads as heads_lib
from bat_jax.probe import step as step_lib
from bat_jax.probe import tasks as tasks_lib
from bat_jax.probe.heads import ProbeConfigError
from bat_jax.probe.metrics import classification_metrics, frame_metrics
from bat_jax.probe.outputs import ProbeWriter, aggregate_folds, check_workdir, save_params, write_json

Say = Callable[[str], None]


def _check_config(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    names = heads_lib.probe_names(cfg.probes)
    if any(n in heads_lib.FRAME_WISE for n in names):
        heads_lib.frame_loss_name(cfg)
    heads_lib.check_optimizer(cfg)
    if cfg.get("cache", {}).get("enabled", False) and heads_lib.VQT in names:
        raise ProbeConfigError(
            "cache.enabled: vqt runs the encoder with its own query tokens, so its features cannot be "
            "cached; probe vqt in a run without the cache"
        )
    if int(cfg.train.batch_size) < 1:
        raise ProbeConfigError(f"train.batch_size: expected at least 1 clip, found {cfg.train.batch_size}")
    if not cfg.encoder.path:
        raise ProbeConfigError(
            "encoder.path: expected an encoder to probe (anything bat_jax.load_encoder reads: a pretraining "
            "workdir, a bat-jax checkpoint, a Hugging Face BAT folder, a BAT/EAT/SSLAM .pt), found none set"
        )
    if cfg.encoder.dtype not in ("float32", "bfloat16"):
        raise ProbeConfigError(
            f"encoder.dtype: expected 'float32' or 'bfloat16', found {cfg.encoder.dtype!r}"
        )
    return names


def _mesh(batch_size: int) -> tuple[Mesh, NamedSharding, NamedSharding]:
    devices = np.asarray(jax.devices())
    if batch_size % devices.size:
        raise ProbeConfigError(
            f"train.batch_size: expected a multiple of the {devices.size} devices (the batch is split over "
            f"them), found {batch_size}"
        )
    mesh = Mesh(devices, ("data",))
    return mesh, NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())


def run_probe(
    cfg: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    say: Say = print,
    progress: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the probes of `cfg` and write `workdir`; returns the metrics.json dict."""
    from bat_jax.convert.load import load_encoder
    from bat_jax.train.metrics import Progress

    names = _check_config(cfg)
    workdir = Path(workdir)
    encoder = load_encoder(cfg.encoder.path, dtype=cfg.encoder.dtype)
    enc_cfg = encoder.config
    check_workdir(workdir, enc_cfg, overwrite)
    task = tasks_lib.resolve(cfg, enc_cfg)
    loss = heads_lib.loss_name(cfg, task.multilabel)
    frame_loss = heads_lib.frame_loss_name(cfg) if task.frame_wise else None
    heads = heads_lib.build(names, cfg, task.num_classes, enc_cfg.depth, enc_cfg.dim, enc_cfg)
    members = heads_lib.members(cfg)
    mesh, batch_sharding, replicated = _mesh(int(cfg.train.batch_size))
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(
        workdir / "config.json",
        {**cfg.to_dict(), "resolved": _resolved(task, enc_cfg, loss, members, frame_loss)},
    )
    say(
        f"probing {cfg.encoder.path} (depth {enc_cfg.depth}, dim {enc_cfg.dim}, {cfg.encoder.dtype}) with "
        f"{', '.join(names)}: {task.num_classes} classes, {'multi' if task.multilabel else 'single'}-label, "
        f"loss {loss}{_frame_note(frame_loss)}, {task.protocol} ({len(task.evaluations)} evaluation(s)), "
        f"{len(members)} sweep member(s), {mesh.devices.size} device(s)"
    )
    encoder_params = jax.device_put(encoder.params, replicated)
    tx = heads_lib.optimizer(
        cfg, jax.eval_shape(lambda k: step_lib.init_params_of(heads, k), jax.random.key(0))
    )
    forward = step_lib.encoder_forward(enc_cfg)
    losses = dict(
        loss=heads_lib.loss_fn(loss),
        cfg=cfg,
        out_sharding=replicated,
        frame_loss=heads_lib.loss_fn(frame_loss) if frame_loss else None,
        patch_frames=enc_cfg.patch_size[0],
    )
    # with the cache, the same step on cached tokens: no encoder forward
    train_forward = cache_lib.cached_forward if cfg.cache.enabled else forward
    # on CPU: no YNNPACK fusions for a float32 encoder's steps and for the heads on cached tokens; YNNPACK's
    # bf16 kernels for a bfloat16 encoder's dots (`xla_options`)
    options = xla_options.inference(encoder_dtype=cfg.encoder.dtype)
    train_options = xla_options.inference() if cfg.cache.enabled else options
    train = step_lib.jit_train_step(train_forward, heads, tx, **losses, compiler_options=train_options)
    evaluate = step_lib.jit_eval_step(forward, heads, compiler_options=options)
    writer = ProbeWriter(workdir)
    total = int(cfg.train.steps) * len(task.evaluations)
    bar = Progress(0, total, enabled=progress)
    results: dict[str, Any] = {}
    gates: dict[str, Any] = {}
    per_layer: dict[str, Any] = {}
    try:
        for k, evaluation in enumerate(task.evaluations):
            run = _Run(cfg, task, evaluation, heads, members, mesh, batch_sharding, replicated, writer, bar)
            run.patch_frames = enc_cfg.patch_size[0]
            loader = (
                run.cached_loader(enc_cfg, forward, encoder_params, workdir, say)
                if cfg.cache.enabled
                else None
            )
            state = run.train(
                train, evaluate, tx, encoder_params, offset=k * int(cfg.train.steps), loader=loader
            )
            test = run.evaluate(evaluate, state.params, encoder_params, evaluation.test)
            save_params(workdir, evaluation.name, state.params, replicated)
            _collect(results, gates, names, members, evaluation.name, test, run.best, state)
            if heads_lib.PER_LAYER in test:
                per_layer[evaluation.name] = test[heads_lib.PER_LAYER]
            bar.write(f"{_label(evaluation)} test: {_summary(test, names, members)}")
            say(f"jit cache sizes: train {train._cache_size()}, eval {evaluate._cache_size()}")
    finally:
        bar.close()
        writer.close()
    if task.protocol == "kfold":
        results = aggregate_folds(results)
    write_json(workdir / "metrics.json", results)
    write_json(workdir / "gates.json", gates)
    if per_layer:
        write_json(workdir / "per_layer_lp.json", _per_layer_json(per_layer, members, task.multilabel))
    _plot(workdir, gates)
    say(f"wrote {workdir}/metrics.json, gates.json, params/ (TensorBoard: tensorboard --logdir {workdir}/tb)")
    return results


def _resolved(task, enc_cfg, loss, members, frame_loss=None) -> dict[str, Any]:
    return {
        "num_layers": enc_cfg.depth,
        "dim": enc_cfg.dim,
        "num_classes": task.num_classes,
        "vocabulary": task.vocabulary,
        "multilabel": task.multilabel,
        "loss": loss,
        "protocol": task.protocol,
        "evaluations": [e.name for e in task.evaluations],
        "members": [m["label"] for m in members],
        "frame_wise": task.frame_wise,
        **({"frame_loss": frame_loss, "hop_seconds": task.hop_seconds} if frame_loss else {}),
    }


def _frame_note(frame_loss: str | None) -> str:
    return f" (frame-wise: {frame_loss})" if frame_loss else ""


def _label(evaluation) -> str:
    return f"fold {evaluation.name}" if evaluation.name else "run"


def _primary(metrics: dict[str, Any]) -> float:
    """The figure the best validation is chosen by: accuracy, else mAP, else frame-wise mAP."""
    value = next((metrics[k] for k in ("accuracy", "map", "frame_map") if metrics.get(k) is not None), None)
    return -math.inf if value is None else float(value)


def _summary(results: dict, names, members) -> str:
    parts = []
    for name in names:
        for m, member in enumerate(members):
            r = results[name][m]
            key = heads_lib.member_key(name, member["label"])
            figures = [
                f"{label} {r[k]:.4f}"
                for k, label in (("accuracy", "acc"), ("map", "mAP"), ("frame_map", "frame mAP"))
                if r.get(k) is not None
            ]
            parts.append(f"{key}: {', '.join(figures) or 'no scored class'}")
    return "; ".join(parts)


def _public(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "map", "frame_map", "frame_map_micro", "f1", "per_class_ap", "num_examples",
            "num_frames", "num_scored_classes")  # fmt: skip
    return {k: metrics[k] for k in keys if k in metrics}


def _collect(results, gates, names, members, fold, test, best, state) -> None:
    gate_values = step_lib.gates(jax.device_get(state.params), heads_lib.gated(names))
    for name in names:
        for m, member in enumerate(members):
            key = heads_lib.member_key(name, member["label"])
            entry = {"test": _public(test[name][m])}
            if best.get((name, m)) is not None:
                step, metrics = best[(name, m)]
                entry["best_validation"] = {**_public(metrics), "step": step}
            if fold:
                results.setdefault(key, {"folds": {}})["folds"][fold] = entry
            else:
                results[key] = entry
            if name in gate_values:
                weights = [float(w) for w in np.asarray(gate_values[name][m])]
                if fold:
                    gates.setdefault(key, {})[fold] = weights
                else:
                    gates[key] = weights


def _per_layer_json(per_layer: dict, members, multilabel: bool) -> dict[str, Any]:
    """{"metric", "values": [v_1..v_L]} (mean over folds; the first sweep member), with "folds" and
    "members" where there are several."""
    metric = "map" if multilabel else "accuracy"

    def values(fold_results, m):
        return [r[metric] for r in fold_results[m]]

    folds = {fold: values(r, 0) for fold, r in per_layer.items()}
    out: dict[str, Any] = {"metric": metric, "values": [float(v) for v in np.mean(list(folds.values()), 0)]}
    if len(folds) > 1:
        out["folds"] = folds
    if len(members) > 1:
        out["members"] = {
            mb["label"]: [float(v) for v in np.mean([values(r, m) for r in per_layer.values()], 0)]
            for m, mb in enumerate(members)
        }
    return out


def _plot(workdir: Path, gates: dict) -> None:
    if not gates:
        return
    try:
        from bat_jax.probe.report import save_gates_png
    except ImportError:  # matplotlib missing: the JSON is written, the picture is optional
        print("gates.png not written: matplotlib is not installed", file=sys.stderr)
        return
    save_gates_png(workdir)


class _Run:
    """One evaluation's training and evaluation loops."""

    def __init__(self, cfg, task, evaluation, heads, members, mesh, batch_sharding, replicated, writer, bar):
        self.cfg, self.task, self.evaluation = cfg, task, evaluation
        self.heads, self.members, self.mesh = heads, members, mesh
        self.batch_sharding, self.replicated = batch_sharding, replicated
        self.writer, self.bar = writer, bar
        self.best: dict[tuple[str, int], tuple[int, dict]] = {}
        self.frames = int(cfg.frames)
        self.patch_frames = 16  # the encoder's time patch (set by run_probe)

    def _loader(self, subset, train: bool):
        common = dict(
            global_batch_size=int(self.cfg.train.batch_size),
            target_frames=self.frames,
            sharding=self.batch_sharding,
            num_classes=self.task.num_classes,
            worker_count=int(self.cfg.data.worker_count),
            indices=subset.indices,
        )
        if self.task.frame_wise:
            common["frame_labels"] = (self.patch_frames, self.task.hop_seconds)
        from bat_jax.data.sampling import SAMPLERS

        sampler = self.cfg.data.get("sampler", "shuffle")  # training only: evaluation reads every clip once
        if sampler not in SAMPLERS:  # checked at every loader, so also before the feature cache is built
            raise ProbeConfigError(f"data.sampler: expected one of {', '.join(SAMPLERS)}, found {sampler!r}")
        try:
            if train:
                return PretrainLoader(
                    subset.paths, seed=int(self.cfg.train.seed), roll=False, sampler=sampler, **common
                )
            return EvalLoader(subset.paths, **common)
        except ValueError as e:
            raise ProbeConfigError(f"{subset.describe()}: {e}") from None

    def cached_loader(self, enc_cfg, forward, encoder_params, workdir: Path, say: Say):
        """Build the feature cache of this evaluation's training clips (size printed first); its batches."""
        subset = self.evaluation.train
        tokens, grid = cache_lib.tokens_per_clip(self.frames, enc_cfg)
        per_clip = cache_lib.bytes_per_clip(enc_cfg.depth, tokens, enc_cfg.dim)
        folder = Path(self.cfg.cache.dir or workdir / "cache") / (self.evaluation.name or "train")
        place, total = cache_lib.plan(subset.num_clips, per_clip, self.cfg.cache.where, folder)
        say(
            f"feature cache: {subset.num_clips} clips × {enc_cfg.depth} layers × {tokens} tokens × "
            f"{enc_cfg.dim} × 2 B = {total / 1e6:.1f} MB in {place}"
            + ("" if place == "memory" else f" ({folder})")
        )
        cache = cache_lib.FeatureCache(
            subset.num_clips, enc_cfg.depth, grid, enc_cfg.dim, self.task.num_classes, place, folder,
            frame_patches=grid[0] if self.task.frame_wise else 0,
        )  # fmt: skip
        options = xla_options.inference(encoder_dtype=enc_cfg.dtype)
        cache_lib.build(cache, self._loader(subset, train=False), forward, encoder_params, say, options)
        return cache_lib.CachedBatches(
            cache,
            int(self.cfg.train.batch_size),
            int(self.cfg.train.seed),
            self.batch_sharding,
            self.cfg.data.get("sampler", "shuffle"),
        )

    def train(self, train_step, eval_step, tx, encoder_params, offset: int, loader=None):
        cfg = self.cfg
        state = step_lib.init_state(self.heads, tx, self.members)
        state = jax.device_put(state, self.replicated)
        steps, log_every = int(cfg.train.steps), max(1, int(cfg.train.log_every))
        eval_every = int(cfg.train.eval_every) or steps
        prefix = f"{self.evaluation.name}/" if self.evaluation.name else ""
        loader = loader or self._loader(self.evaluation.train, train=True)
        start = time.perf_counter()
        try:
            for i in range(1, steps + 1):
                state, parts = train_step(state, encoder_params, next(loader))
                self.bar.update()
                if i % log_every == 0 or i == steps:
                    losses = {k: float(np.mean(v)) for k, v in jax.device_get(parts).items()}
                    if not all(math.isfinite(v) for v in losses.values()):
                        raise FloatingPointError(f"{prefix}step {i}: a probe's loss is not finite: {losses}")
                    elapsed = time.perf_counter() - start
                    scalars = {f"loss/{k}": v for k, v in losses.items()}
                    scalars["clips_per_s"] = log_every * int(cfg.train.batch_size) / max(elapsed, 1e-9)
                    self.writer.write(offset + i, scalars, prefix + "train")
                    self.bar.show({"loss": sum(losses.values()) / len(losses), **scalars})
                    start = time.perf_counter()
                if self.evaluation.validation is not None and (i % eval_every == 0 or i == steps):
                    self._validate(eval_step, state.params, encoder_params, i, offset, prefix)
        finally:
            loader.close()
        return state

    def _validate(self, eval_step, params, encoder_params, step, offset, prefix):
        metrics = self.evaluate(eval_step, params, encoder_params, self.evaluation.validation)
        scalars = {}
        for name in self.heads:
            if name == heads_lib.PER_LAYER:
                continue
            for m, member in enumerate(self.members):
                r = metrics[name][m]
                key = heads_lib.member_key(name, member["label"])
                for metric in ("accuracy", "map", "frame_map", "f1"):
                    if r.get(metric) is not None:
                        scalars[f"{metric}/{key}"] = r[metric]
                old = self.best.get((name, m))
                if old is None or _primary(r) > _primary(old[1]):
                    self.best[(name, m)] = (step, r)
        self.writer.write(offset + step, scalars, prefix + "validation")

    def evaluate(self, eval_step, params, encoder_params, subset) -> dict[str, list[dict]]:
        """{probe: [metrics of member m]} on every clip of `subset` (padding rows excluded; frame-wise
        probes: every time patch that holds audio)."""
        loader = self._loader(subset, train=False)
        logits: dict[str, list[np.ndarray]] = {name: [] for name in self.heads}
        keys = ("labels", "valid") + (("frame_labels", "num_frames") if self.task.frame_wise else ())
        host: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        for batch in loader:
            out = eval_step(params, encoder_params, batch)
            for name, value in _gather(out).items():
                logits[name].append(value)
            for k, value in _gather({k: batch[k] for k in keys}).items():
                host[k].append(value)
        got = {k: np.concatenate(v) for k, v in host.items()}
        y, keep = got["labels"], got["valid"]
        results = {}
        score = lambda z: classification_metrics(z, y, multilabel=self.task.multilabel, mask=keep)  # noqa: E731
        for name in self.heads:
            if name == heads_lib.PER_LAYER:  # [S, L, N, C]: per member, a list over layers
                all_logits = np.concatenate(logits[name], axis=2)
                results[name] = [[score(z) for z in member] for member in all_logits]
            elif name in heads_lib.FRAME_WISE:  # [S, N, T', C] against the frame targets
                all_logits = np.concatenate(logits[name], axis=1)
                frames = got["frame_labels"]
                mask = keep[:, None] & _frame_mask(got["num_frames"], frames.shape[1], self.patch_frames)
                results[name] = [frame_metrics(z, frames, mask=mask) for z in all_logits]
            else:
                all_logits = np.concatenate(logits[name], axis=1)  # [S, N, C]
                results[name] = [score(all_logits[m]) for m in range(len(self.members))]
        return results


def _frame_mask(num_frames: np.ndarray, num_patches: int, patch_frames: int) -> np.ndarray:
    """numpy twin of `step.frame_mask`: bool [N, T'], time patch t holds audio."""
    return np.arange(num_patches)[None, :] * patch_frames < np.asarray(num_frames)[:, None]


def _gather(tree):
    """Device arrays sharded over the batch → numpy on the host (all processes' rows)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def print_json(results: dict) -> str:
    return json.dumps(results, indent=2)
