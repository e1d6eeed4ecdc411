"""EncoderConfig: every number that defines a BAT/EAT-style ViT encoder.

A frozen dataclass, convertible to and from a dict / JSON (`to_dict`, `from_dict`, `to_json`,
`from_json`); the Hugging Face `config.json` of the released encoder is read in `convert/hf.py`.
Presets: `bat_base()` (ViT-B/16, gated), `bat_small()` (ViT-S/16, gated), `eat_base()` (ViT-B/16 without
gates, EAT/SSLAM checkpoints) and `tiny()` (dim 64, depth 3, 4 heads: the size of the test fixtures).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax

_WHERE = "bat_jax/models/config.py"

# Remat choices besides the names of `jax.checkpoint_policies` ("dots_saveable", "nothing_saveable", ...).
REMAT_NONE = "none"
REMAT_FULL = "full"  # recompute everything inside a block (jax.checkpoint without a policy)

# Layouts of the fixed 2-D sin-cos table (grid rows, grid columns), flattened row-major and sliced to the
# first n positions, while tokens are flattened time-major (index t·F + f):
#   BAT (reference `ViT`):        (F, T_max) = (8, 64) — the rows are not the frequency patches of the
#                                 tokens; every token still gets a unique position (a quirk kept for parity);
#   EAT / SSLAM (fairseq images): (T_max, F) = (64, 8) — row = time patch, column = frequency patch.
POS_GRID_BAT = (8, 64)
POS_GRID_EAT = (64, 8)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Architecture of the ViT audio encoder (see PAPER.md §2.1)."""

    dim: int = 768  # token width D
    depth: int = 12  # number of transformer blocks L
    num_heads: int = 12
    mlp_ratio: float = 4.0  # MLP hidden width = int(dim * mlp_ratio)
    qkv_bias: bool = True
    use_gate: bool = True  # sigmoid gate on the concatenated head outputs (BAT); False for EAT/SSLAM
    pre_norm: bool = True  # LayerNorm over [CLS; patches] before the first block
    layer_norm_first: bool = False  # False: post-norm blocks (BAT, EAT); True: pre-norm blocks
    eps: float = 1e-6  # LayerNorm epsilon
    patch_size: tuple[int, int] = (16, 16)  # (time, frequency) of the conv patch embedding
    n_mels: int = 128  # frequency bins of the input spectrogram
    chunk_time_patches: int = 64  # longer inputs are encoded in chunks of this many time patches
    pos_grid: tuple[int, int] = POS_GRID_BAT  # layout of the sin-cos table, see POS_GRID_* above
    remat_policy: str = REMAT_NONE  # "none", "full" or a jax.checkpoint_policies name
    # run the blocks as one jax.lax.scan over their stacked parameters (same parameter layout, same values):
    # XLA compiles one block instead of L, but keeps more activations (BAT-B's pretraining step for v5p:
    # 13 % faster to compile, 1.8x the memory; benchmarks/RESULTS.md), see BatEncoder.run_blocks
    scan_blocks: bool = False
    dtype: str = "float32"  # computation dtype
    param_dtype: str = "float32"  # parameter dtype

    def __post_init__(self):
        # JSON turns tuples into lists; keep the dataclass hashable (it is a static jit argument).
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "pos_grid", tuple(int(p) for p in self.pos_grid))
        self.validate()

    # ------------------------------------------------------------------------------------------------
    # Derived sizes

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @property
    def freq_patches(self) -> int:
        return self.n_mels // self.patch_size[1]

    @property
    def max_positions(self) -> int:
        return self.pos_grid[0] * self.pos_grid[1]

    @property
    def chunk_frames(self) -> int:
        return self.chunk_time_patches * self.patch_size[0]

    def validate(self) -> None:
        """Raise ValueError when the numbers do not describe a buildable encoder."""
        problems = []
        if self.dim <= 0 or self.depth <= 0 or self.num_heads <= 0:
            problems.append(
                f"dim, depth, num_heads must be positive, got {self.dim}, {self.depth}, {self.num_heads}"
            )
        elif self.dim % self.num_heads:
            problems.append(f"dim {self.dim} must be divisible by num_heads {self.num_heads}")
        if self.dim % 4:
            problems.append(f"dim {self.dim} must be a multiple of 4 for the 2-D sin-cos positions")
        if len(self.patch_size) != 2 or len(self.pos_grid) != 2:
            problems.append(
                f"patch_size and pos_grid must have 2 entries, got {self.patch_size}, {self.pos_grid}"
            )
        elif self.n_mels % self.patch_size[1]:
            problems.append(
                f"n_mels {self.n_mels} must be a multiple of the patch height {self.patch_size[1]}"
            )
        elif self.chunk_time_patches * self.freq_patches > self.max_positions:
            problems.append(
                f"a chunk of {self.chunk_time_patches} x {self.freq_patches} patches needs more positions "
                f"than the sin-cos grid {self.pos_grid} holds ({self.max_positions})"
            )
        if self.remat_policy not in (REMAT_NONE, REMAT_FULL) and not hasattr(
            jax.checkpoint_policies, self.remat_policy
        ):
            problems.append(
                "remat_policy must be 'none', 'full' or a jax.checkpoint_policies name, "
                f"got {self.remat_policy!r}"
            )
        if problems:
            raise ValueError(f"invalid EncoderConfig ({_WHERE}): " + "; ".join(problems))

    # ------------------------------------------------------------------------------------------------
    # Serialisation

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["pos_grid"] = list(self.pos_grid)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EncoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown EncoderConfig fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(d))

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> EncoderConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> EncoderConfig:
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------------
# Presets


def bat_base(**overrides: Any) -> EncoderConfig:
    """BAT ViT-B/16: 768 wide, 12 blocks, 12 heads, gated attention (91M parameters with the gates)."""
    return EncoderConfig(**{"dim": 768, "depth": 12, "num_heads": 12, **overrides})


def bat_small(**overrides: Any) -> EncoderConfig:
    """BAT ViT-S/16 (paper Appendix C): 384 wide, 12 blocks, 6 heads, gated attention."""
    return EncoderConfig(**{"dim": 384, "depth": 12, "num_heads": 6, **overrides})


def eat_base(**overrides: Any) -> EncoderConfig:
    """EAT / SSLAM ViT-B/16: no attention gates; sin-cos table in the fairseq (time, frequency) layout."""
    return EncoderConfig(
        **{"dim": 768, "depth": 12, "num_heads": 12, "use_gate": False, "pos_grid": POS_GRID_EAT, **overrides}
    )


def tiny(**overrides: Any) -> EncoderConfig:
    """A tiny gated encoder for tests (the size of the reference fixtures: dim 64, depth 3, 4 heads)."""
    return EncoderConfig(**{"dim": 64, "depth": 3, "num_heads": 4, **overrides})


PRESETS = {"bat_base": bat_base, "bat_small": bat_small, "eat_base": eat_base, "tiny": tiny}
