"""`bat-jax convert SRC OUT`: import a PyTorch encoder checkpoint into a bat-jax (Orbax) checkpoint."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Convert a released encoder checkpoint into a bat-jax checkpoint folder.

SRC may be:
  * a Hugging Face BAT folder holding model.safetensors + config.json
    (the lrauch/BAT-vit-b16-pretrainedAS2M layout), or that model.safetensors file
    with its config.json beside it;
  * a BAT .pt checkpoint (the authors' BAT_base.pt: student.encoder.* tensors,
    optionally under 'state_dict'); the head count comes from a config.json beside
    it or from --num-heads;
  * an EAT or SSLAM fairseq .pt checkpoint (modality_encoders.IMAGE.* + blocks.*;
    no attention gates); the head count comes from the checkpoint's stored model
    config or from --num-heads;
  * a bat-jax checkpoint folder (re-saves it).
Reading .pt files needs torch:  pip install 'bat-jax[torch]'

The architecture is read from the file; a tensor whose shape disagrees with it,
a missing key, an unexpected key or a NaN/Inf value is an error (never a partial
load). Tensors may be stored as float32, float16 or bfloat16; they are written
as float32. Every input error (missing, unreadable or truncated file, unknown
format, wrong shapes, torch not installed, ...) is one line on stderr, exit 1.

OUT is written as:
  OUT/config.json   {"format": "bat-jax-encoder", "format_version": 1,
                     "config": <EncoderConfig fields>, "source": SRC}
  OUT/params/       Orbax (StandardCheckpointer) checkpoint of the parameters

Load it back with  bat_jax.load_encoder(OUT).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert",
        help="import a BAT/EAT/SSLAM PyTorch encoder checkpoint into a bat-jax checkpoint",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="checkpoint file or folder to import (see above)")
    parser.add_argument("out", metavar="OUT", help="output folder (config.json + params/)")
    parser.add_argument(
        "--num-heads",
        type=int,
        default=None,
        help="attention heads, needed when SRC does not say (ViT-B: 12, ViT-S: 6); must agree when it does",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT/params if it already exists")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from bat_jax.convert.checkpoint import save_encoder
    from bat_jax.convert.errors import one_line
    from bat_jax.convert.leftover_reads import drop_until_exit
    from bat_jax.convert.load import load_encoder
    from bat_jax.models.encoder import param_count

    # A failed Orbax restore's TensorStore reads report late (even at exit): not after our one-line error.
    drop_until_exit()
    try:
        encoder = load_encoder(args.src, num_heads=args.num_heads)
        out = save_encoder(encoder, args.out, source=str(args.src), overwrite=args.overwrite)
    # CheckpointError is a ValueError; OSError covers missing files, FileExistsError, PermissionError.
    except (ValueError, OSError, ImportError) as e:
        print(f"bat-jax convert: error: {one_line(e, limit=2000)}", file=sys.stderr)
        return 1
    cfg = encoder.config
    print(
        f"converted {args.src} -> {out}: dim {cfg.dim}, depth {cfg.depth}, heads {cfg.num_heads}, "
        f"gate {cfg.use_gate}, positions grid {list(cfg.pos_grid)}, "
        f"{param_count(encoder.params):,} parameters"
    )
    return 0
