"""The synthetic source: the built-in synthetic dataset (bat_jax.audio.synthetic), no download."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bat_jax.data.sources.base import (
    SAMPLE_RATE,
    ClipTask,
    SourceError,
    SourcePlan,
    SplitPlan,
    _digest,
    resample,
)

SYNTHETIC_EVAL_INDEX = 1_000_000  # eval clips are synthetic indices from here on: never a train clip


@dataclass(frozen=True)
class SyntheticLoader:
    """Generates synthetic clip `task.index` (bat_jax.audio.synthetic.make_clip) at 16 kHz; with `events`,
    returns its true sound events too, (wave, labels, (), events) (make_clip_events; seconds)."""

    config: Any  # bat_jax.audio.synthetic.SyntheticConfig
    events: bool = False

    def __call__(self, task: ClipTask) -> tuple:
        from bat_jax.audio.synthetic import make_clip_events

        wave, labels, events = make_clip_events(task.index, self.config)
        wave = resample(wave, self.config.sample_rate)
        return (wave, labels, (), events) if self.events else (wave, labels)


def synthetic_source(
    *,
    num_clips: int,
    num_eval_clips: int,
    seed: int = 0,
    multilabel: bool = False,
    min_seconds: float | None = None,
    max_seconds: float | None = None,
    events: bool = False,
) -> SourcePlan:
    """The built-in synthetic dataset: split "train" (indices 0..num_clips-1) and "eval" (indices from
    SYNTHETIC_EVAL_INDEX, disjoint from train and independent of num_clips); labels in CLASS_NAMES order.
    `events` (--synthetic-events): the records carry each clip's true sound events; the inputs digest and
    the description (`synthetic_events`) change with it, so an output made without them is not resumed."""
    from bat_jax.audio import synthetic

    if not 0 <= num_clips < SYNTHETIC_EVAL_INDEX:
        raise SourceError(f"--num-clips: expected 0 <= N < {SYNTHETIC_EVAL_INDEX}, found {num_clips}")
    if num_eval_clips < 0:
        raise SourceError(f"--num-eval-clips: expected N >= 0, found {num_eval_clips}")
    durations = {
        k: v for k, v in (("min_seconds", min_seconds), ("max_seconds", max_seconds)) if v is not None
    }
    try:
        config = synthetic.SyntheticConfig(
            num_clips=num_clips, seed=seed, multilabel=multilabel, sample_rate=SAMPLE_RATE, **durations
        )
    except ValueError as e:
        raise SourceError(str(e)) from e
    loader = SyntheticLoader(config, events)
    plans = []
    for name, start, count in (("train", 0, num_clips), ("eval", SYNTHETIC_EVAL_INDEX, num_eval_clips)):
        if count == 0:
            continue
        ids = [(i, synthetic.clip_id(i, config)) for i in range(start, start + count)]
        tasks = [ClipTask(i, cid, cid) for i, cid in ids]
        digest = _digest([*ids, "synthetic_events"] if events else ids)
        plans.append(SplitPlan(name, tasks, [], loader, digest))
    # "synthetic_events" only with events (outputs made before the option existed still resume), second so
    # that the message refusing to resume an output made without them shows it
    description = {"kind": "synthetic", **({"synthetic_events": True} if events else {})}
    description.update(
        config={k: v for k, v in vars(config).items() if k != "num_clips"},
        eval_first_index=SYNTHETIC_EVAL_INDEX,
    )
    return SourcePlan("synthetic", description, list(synthetic.CLASS_NAMES), plans)
