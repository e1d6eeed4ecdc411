"""BAT ViT-B/16 pretraining on AudioSet-2M: the paper's recipe (PAPER.md §2.4), the one home of its numbers.

The code has no recipe defaults: bat_jax.train.config builds SSLConfig (`ssl_config`), the optimizer
(`optimizer`) and the loader's arguments (`loader_kwargs`) from this file; bat_small.py, eat_style.py and
tiny.py start from get_config() here and change only what differs.

Use with ml_collections config flags, e.g. `--config=configs/pretrain/bat_base.py
--config.data.global_batch_size=96`, or `bat_jax.train.config.load("configs/pretrain/bat_base.py")`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # Spectrogram frames per clip, the one key for this number: the loader crops / zero-pads every clip to
    # it (make_pretrain_loader's target_frames) and the SSL objective's patch grid is built from it
    # (SSLConfig.frames: 1024 / 16 = 64 time patches x 8 frequency patches = 512 patches).
    c.frames = 1024  # 10.24 s at hop 160 (shards from `bat-jax prepare --clip-seconds 10.23`)

    # Encoder: any bat_jax.models.config.EncoderConfig field; preset first, then the overrides.
    c.encoder = ml_collections.ConfigDict()
    c.encoder.preset = "bat_base"  # 768 wide, 12 blocks, 12 heads, gated attention, post-norm
    # scan_blocks: the blocks as one lax.scan (same parameters and values; XLA compiles one block, not 12):
    # the step compiles 13 % faster for v5p but needs 1.8x the memory per chip, so the loop stays.
    c.encoder.overrides = ml_collections.ConfigDict(
        {"dtype": "bfloat16", "remat_policy": "none", "scan_blocks": False}
    )

    # Self-supervised objective: bat_jax.models.ssl_objective.SSLConfig fields.
    c.ssl = ml_collections.ConfigDict()
    c.ssl.num_views = 16
    c.ssl.mask_ratio = 0.8  # 102 of 512 patches kept per view
    c.ssl.mask_block = 5
    c.ssl.mask_adjust = 0.07
    c.ssl.decoder_depth = 6
    c.ssl.decoder_heads = 12
    c.ssl.decoder_mlp_ratio = 4.0
    c.ssl.global_weight = 1.0
    c.ssl.local_weight = 1.0
    c.ssl.target = "eob"  # end-of-block teacher outputs (BAT); "ffn" for data2vec 2.0 / EAT
    c.ssl.target_eps = 1e-6  # inside both target norms
    c.ssl.instance_norm_targets = True  # each teacher layer over its tokens
    c.ssl.layer_norm_targets = True  # the layer average over its features
    c.ssl.ema_start = 0.9998  # EMA decay ramped linearly ...
    c.ssl.ema_end = 0.99999  # ... to this ...
    c.ssl.ema_warmup_steps = 100_000  # ... over the first 100k updates, then constant

    # AdamW + linear warm-up + cosine (bat_jax.train.step.make_optimizer's arguments; total = train.steps).
    c.optim = ml_collections.ConfigDict()
    c.optim.peak_lr = 5e-4
    c.optim.warmup_steps = 53_000  # configs/ssl.yaml of the reference; the paper text says 50k
    c.optim.end_lr = 1e-6
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.05

    # Input: shards written by `bat-jax prepare` (the clip length: c.frames above).
    c.data = ml_collections.ConfigDict()
    c.data.root = "data/as2m"
    c.data.split = "train"
    c.data.global_batch_size = 48  # the paper's 4 GPUs x 12 clips, x 16 views
    c.data.worker_count = 8
    c.data.seed = 0

    # Devices: a (data, fsdp) mesh (bat_jax/train/mesh.py); the global batch is split over data x fsdp.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = ml_collections.ConfigDict({"data": -1, "fsdp": 1})  # -1: the devices the others leave
    # Always named (jax.make_mesh defaults to Explicit, jax.sharding.Mesh to Auto); the models' sharding
    # constraints leave the FSDP all-gathers to the compiler: Auto.
    c.mesh.axis_types = ml_collections.ConfigDict({"data": "auto", "fsdp": "auto"})
    # Logical axis names of the models (bat_jax/models/layers.py) -> mesh axes, first match first: the
    # activations' batch over every device; parameters (no batch axis) split along their width over fsdp
    # (FSDP; a no-op while fsdp = 1; ("embed", None) replicates them). Unlisted names stay whole.
    c.mesh.rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("length", None),
        ("mlp", None),
        ("qkv", None),
        ("heads", None),
        ("kv", None),
    )

    c.train = ml_collections.ConfigDict()
    c.train.steps = 400_000  # the run's length; the learning-rate schedule ends here too
    c.train.micro_batches = 1  # gradient accumulation: micro-batches per update (the batch divides by it)
    c.train.seed = 0
    c.train.log_every = 100
    c.train.checkpoint_every = 5_000
    c.train.keep = 3  # checkpoints kept: the last `keep` ...
    c.train.keep_every = 50_000  # ... plus every `keep_every`-th step (0: none)
    c.train.init_from = ""  # continued pretraining: anything bat_jax.load_encoder reads ("": random init)
    # The MFU's denominator: peak FLOP/s of one device (e.g. 989e12, an H100 SXM at bf16). 0: the vendor's
    # figure for a known TPU / GPU (bat_jax/train/flops.py PEAK_TABLE), else a matmul measured at the start.
    c.train.peak_flops_per_device = 0.0
    return c
