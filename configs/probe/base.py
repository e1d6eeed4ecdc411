"""The probing recipe every task starts from (PAPER.md §1.3; the reference's probe configs).

A task file loads this `get_config()` and states only what differs: frames, batch, steps, warm-up, weight
decay, loss and splits. Keys users set most: encoder.path, data.root, probes, train.steps,
train.batch_size, train.seed (see `bat-jax probe --help`).
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "base"
    c.frames = 1024  # spectrogram frames per clip: crop / zero-pad (no augmentation while probing)
    c.probes = "cgp"  # comma-separated: cgp, cgp_patch_avg, lcgp, h2t, lp, protobin, vqt
    c.per_layer_lp = False  # also a linear probe on each layer's CLS token: per_layer_lp.json, gates.png
    c.loss = "auto"  # cross_entropy (single-label), bce (multi-label), asymmetric (AudioSet), auto

    c.encoder = ml_collections.ConfigDict()
    c.encoder.path = ""  # anything bat_jax.load_encoder reads; required
    c.encoder.dtype = "bfloat16"  # the frozen forward (the reference autocasts BAT to bf16)
    c.encoder.frontend = "auto"  # the front-end the encoder expects: auto (EAT layout: kaldi, else bat)

    c.probe = ml_collections.ConfigDict()
    c.probe.num_prototypes = 10_000  # K, CGP and ProtoBin
    c.probe.dropout_rate = 0.2  # head dropout
    c.probe.lasso_weight = 1e-4  # H2T's group lasso (0 on AudioSet)
    c.probe.vqt_queries = 10  # VQT's query tokens per block

    c.optim = ml_collections.ConfigDict()
    c.optim.peak_lr = 1e-3
    c.optim.end_lr = 1e-6
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.05
    c.optim.warmup_steps = 500
    c.optim.decay_regex = r"(^|/)fc/kernel$"  # weight decay on the linear weights only

    c.train = ml_collections.ConfigDict()
    c.train.steps = 20_000
    c.train.batch_size = 48
    c.train.seed = 0
    c.train.eval_every = 0  # validate every N updates (0: at the end); only with a validation split
    c.train.log_every = 50
    c.train.sweep_lrs = ""  # e.g. "1e-3,3e-4": a sweep in the same jitted step
    c.train.sweep_seeds = ""  # e.g. "0,1,2"

    c.cache = ml_collections.ConfigDict()
    c.cache.enabled = False  # compute the training clips' per-layer tokens once (bf16), reuse every epoch
    c.cache.where = "auto"  # memory when it fits in half the available memory, else disk; or memory / disk
    c.cache.dir = ""  # the disk cache's folder (default WORKDIR/cache)

    c.data = ml_collections.ConfigDict()
    c.data.root = ""  # a `bat-jax prepare` folder; required
    c.data.eval_root = ""  # another prepared folder for the validation / test splits (same labels)
    c.data.train_split = "train"
    c.data.validation_split = "validation"
    c.data.test_split = "test"
    c.data.kfold = False  # cross-validation over the train split's folds (prepare --fold-column)
    c.data.holdout = 0.2  # a dataset prepared as one split: this fraction is held out as the test set
    c.data.holdout_seed = 0
    c.data.multilabel = "auto"  # single, multi, or auto (read from the training clips' labels)
    c.data.worker_count = 0  # Grain worker processes (0: read in this process)
    c.data.sampler = "shuffle"  # training order: shuffle (a permutation per epoch) or class_balanced (draws)
    return c
