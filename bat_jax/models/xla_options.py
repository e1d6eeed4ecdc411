"""XLA compile options for jitted functions whose heavy part is a frozen encoder's forward (inference).

    jax.jit(fn, compiler_options=xla_options.inference())

On CPU, jaxlib >= 0.9's XLA fuses dots with their neighbouring element-wise ops and reductions into YNNPACK
kernels (``xla_cpu_experimental_ynn_fusion_type``). For the encoder's forward alone that is slower than XLA's
own emitters with separate matmuls: measured on a 2-core AMD EPYC (benchmarks/RESULTS.md, "Issue 8"), the
192-wide 4-block encoder at 1024 frames, batch 16: 0.57-0.61 s per forward with the fusions, 0.39-0.44 s
without (the fused proj → LayerNorm → fc1 → GELU → fc2 → LayerNorm kernel alone took 70-80 ms per block).
Training steps (forward and backward) are faster *with* them (the pretraining step 3.3 s vs 3.9 s), so the
option is given per jitted function, never process-wide. A bfloat16 encoder's dots (bf16 operands, float32
accumulation: `bat_jax.models.layers.Linear`) are another matter: YNNPACK runs them in its bf16 kernels
(AVX512-BF16 where the CPU has it, ≈ 1.6× XLA's own), so for it `inference` asks for YNNPACK on the dots
alone, each its own kernel (`YNN_DOTS_ONLY`: the CGP step 0.34-0.37 s, vs 0.43 s with all of XLA's default
fusions and 0.47 s with none; RESULTS.md). Off CPU, where this jaxlib does not know the option, or where the
user's XLA_FLAGS already choose the YNN fusion types, `inference` returns None.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

# the empty list of fusion types: no YNNPACK fusions (dots then go to XLA's own matmul runtime)
NO_YNN_FUSIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
# YNNPACK for each dot on its own, no fusions with its neighbours (for bfloat16 encoders)
YNN_DOTS_ONLY = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def inference(backend: str | None = None, encoder_dtype: DTypeLike = "float32") -> dict[str, str] | None:
    """The compile options for an inference-heavy jitted function on `backend` (default: JAX's default
    backend) whose encoder computes in `encoder_dtype` (float32 also for a step on cached tokens, which runs
    no encoder): on CPU `NO_YNN_FUSIONS`, or `YNN_DOTS_ONLY` for a bfloat16 encoder, when this jaxlib accepts
    it; else None."""
    return _inference(backend or jax.default_backend(), jnp.dtype(encoder_dtype).name)


@functools.cache
def _inference(backend: str, encoder_dtype: str) -> dict[str, str] | None:
    options = YNN_DOTS_ONLY if encoder_dtype == "bfloat16" else NO_YNN_FUSIONS
    if backend != "cpu" or any(name in os.environ.get("XLA_FLAGS", "") for name in options):
        return None
    try:  # an option an older or newer XLA does not know fails the compile: ask once, on a scalar
        jax.jit(jnp.negative, compiler_options=options).lower(jnp.float32(0)).compile()
    except Exception:  # noqa: BLE001 — any refusal means: compile with the defaults
        return None
    return dict(options)
