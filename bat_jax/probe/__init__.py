"""bat_jax.probe: probing frozen encoders.

metrics   final figures on the host in float64 with scikit-learn's semantics (accuracy, macro mAP, macro
          F1 at 0.5, per-class AP, frame-wise mAP for SED)
splits    a seeded stratified hold-out, and K folds from a per-clip fold value
"""

from bat_jax.probe.metrics import classification_metrics, frame_metrics
from bat_jax.probe.splits import Fold, holdout_split, kfold_splits

__all__ = ["Fold", "classification_metrics", "frame_metrics", "holdout_split", "kfold_splits"]
