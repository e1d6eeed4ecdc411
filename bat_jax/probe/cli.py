"""`bat-jax probe --config FILE --workdir DIR [--config.a.b=v ...]`: probe a frozen encoder."""

from __future__ import annotations

import argparse
import sys

HELP = """\
Train probes (CGP and the baselines) on a frozen encoder's layers and report their test figures.

One frozen encoder forward per batch feeds every probe asked for; the encoder is never trained.

configs: configs/probe/folder.py (your own prepared folder: needs only encoder.path and data.root),
  synthetic.py (the embedded dataset), as20k.py, as2m.py, esc50.py (5-fold), sc2.py (12 classes), hsn.py,
  dcase.py; each states the paper's recipe for that task (frames, batch, steps, warm-up, weight decay, loss).

config overrides, as ml_collections config flags (type-checked; an unknown field is an error):
  --config.encoder.path=PATH       the encoder: anything bat_jax.load_encoder reads (a `bat-jax pretrain`
                                   workdir, a bat-jax checkpoint, a Hugging Face BAT folder, a BAT, EAT or
                                   SSLAM .pt)
  --config.encoder.dtype=bfloat16  the frozen forward's precision (float32 or bfloat16)
  --config.data.root=PATH          a folder written by `bat-jax prepare` (with the encoder's front-end)
  --config.probes=cgp,lp           probes run together: cgp, cgp_patch_avg, lcgp, h2t, lp, protobin, vqt
                                   (vqt runs the encoder again, with its query tokens)
  --config.train.steps=N           updates (the learning-rate schedule ends here)
  --config.train.batch_size=N      clips per update over all devices
  --config.train.seed=N            the probes' initialisation and dropout, and the training order
  --config.train.eval_every=N      validate every N updates (with a validation split; 0: at the end)
  --config.train.sweep_lrs=1e-3,3e-4 / sweep_seeds=0,1   a sweep: every (lr, seed) pair trained in the same
                                   jitted step (one encoder forward per batch), reported per member
  --config.per_layer_lp=True       also a linear probe on each layer's CLS token: per_layer_lp.json, drawn
                                   beside the gates in gates.png
  --config.cache.enabled=True      compute the training clips' tokens once (bf16; size printed first)
  --config.loss=auto               cross_entropy, bce, asymmetric (AudioSet), or auto (by the labels)
  --config.frames=N                spectrogram frames per clip (crop / zero-pad; a multiple of 16)
  --config.optim.peak_lr=1e-3 / weight_decay=0.05 / warmup_steps=N   AdamW; weight decay only on the
                                   linear layers' weights (optim.decay_regex), not on gates or prototypes

splits (in this order):
  data.kfold=True                  K-fold cross-validation from the train split's per-clip folds
                                   (`bat-jax prepare --fold-column fold`): mean and std over folds
  data.test_split exists           train on data.train_split, test on data.test_split, best figures on
                                   data.validation_split when it exists (data.eval_root: another folder)
  otherwise                        a seeded stratified hold-out of data.holdout (0.2) of the one split is
                                   the test set

the workdir DIR:
  metrics.json   per probe: {"test": {"accuracy", "map", "f1", "per_class_ap", ...}, "best_validation":
                 {..., "step"}}; K folds: {"folds": {...}, "test": {"accuracy": mean, "accuracy_std", ...}};
                 sweep members as "cgp@lr=0.001,seed=0"
  gates.json     the convex layer gates of cgp / lcgp: {"cgp": [w_1, ..., w_L]} (per fold: {fold: [...]})
  gates.png      the gates as bars per layer, one panel per probe
  params/        the probe parameters (Orbax), config.json, metrics.jsonl, tb/ (tensorboard --logdir DIR/tb)

metrics: accuracy (single-label), macro mAP and macro F1 at 0.5, per-class AP, in float64 with
  scikit-learn's definitions; a class with no positive clip in the evaluated set has no AP: it is null in
  per_class_ap and left out of the means (num_scored_classes says how many count).

exit status: 0 done, 1 a non-finite loss, 2 a config or input error (said in one line before any compute).

example:
  bat-jax prepare --source synthetic --out data/demo
  bat-jax pretrain --config configs/pretrain/tiny.py --workdir runs/demo --config.frames=256
  bat-jax probe --config configs/probe/synthetic.py --workdir runs/demo-probe \\
      --config.encoder.path=runs/demo --config.data.root=data/demo
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "probe",
        help="train CGP and baseline probes on a frozen encoder; test figures and layer gates",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="an ml_collections config file")
    parser.add_argument("--workdir", required=True, metavar="DIR", help="metrics, gates, probe params")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in DIR")
    parser.add_argument("--no-progress", action="store_true", help="no console progress bar")
    parser.set_defaults(func=run, config_overrides=True)
    return parser


def run(args: argparse.Namespace) -> int:
    from bat_jax.convert.errors import CheckpointError
    from bat_jax.data.shard_reader import ShardError
    from bat_jax.probe.heads import ProbeConfigError
    from bat_jax.probe.job import run_probe
    from bat_jax.train.cli import parse_config

    try:
        cfg = parse_config(args.config, list(getattr(args, "overrides", [])))
    except (ValueError, FileNotFoundError) as e:
        print(f"bat-jax probe: error: {e}", file=sys.stderr)
        return 2

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        run_probe(cfg, args.workdir, say=say, progress=not args.no_progress, overwrite=args.overwrite)
    except (ProbeConfigError, CheckpointError, ShardError, FileNotFoundError) as e:
        print(f"bat-jax probe: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"bat-jax probe: error: {e}", file=sys.stderr)
        return 1
    return 0
