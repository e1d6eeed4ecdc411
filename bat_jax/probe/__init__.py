"""bat_jax.probe: probing frozen encoders (`bat-jax probe`).

job       run_probe(cfg, workdir): the probing job (config → splits → one jitted step for all probes →
          metrics.json, gates.json, gates.png, probe params)
heads     the run's probes, losses, weight-decay mask, optimizer and sweep members
step      the jitted train / eval steps (one frozen encoder forward per batch feeds every probe)
tasks     which clips train, validate and test: prepared splits, K folds, or a stratified hold-out
outputs   the workdir's files
metrics   final figures on the host in float64 with scikit-learn's semantics (accuracy, macro mAP, macro
          F1 at 0.5, per-class AP, frame-wise mAP for SED)
splits    a seeded stratified hold-out, and K folds from a per-clip fold value
"""

from bat_jax.probe.metrics import classification_metrics, frame_metrics
from bat_jax.probe.splits import Fold, holdout_split, kfold_splits

__all__ = ["Fold", "classification_metrics", "frame_metrics", "holdout_split", "kfold_splits", "run_probe"]


def __getattr__(name: str):
    if name == "run_probe":  # lazy: importing bat_jax.probe does not load JAX
        from bat_jax.probe.job import run_probe

        return run_probe
    raise AttributeError(f"module 'bat_jax.probe' has no attribute {name!r}")
