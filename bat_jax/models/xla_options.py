"""XLA compile options for jitted functions whose heavy part is a frozen encoder's forward (inference).

    jax.jit(fn, compiler_options=xla_options.inference())

On CPU, jaxlib >= 0.9's XLA fuses dots with their neighbouring element-wise ops and reductions into YNNPACK
kernels (``xla_cpu_experimental_ynn_fusion_type``). For the encoder's forward alone that is slower than XLA's
own emitters with separate matmuls: measured on a 2-core AMD EPYC (benchmarks/RESULTS.md, "Issue 8"), the
192-wide 4-block encoder at 1024 frames, batch 16: 0.57-0.61 s per forward with the fusions, 0.39-0.44 s
without (the fused proj → LayerNorm → fc1 → GELU → fc2 → LayerNorm kernel alone took 70-80 ms per block).
Training steps (forward and backward) are faster *with* them (the pretraining step 3.3 s vs 3.9 s), so the
option is given per jitted function, never process-wide. Off CPU, where this jaxlib does not know the
option, or where the user's XLA_FLAGS already choose the YNN fusion types, `inference` returns None.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

# the empty list of fusion types: no YNNPACK fusions (dots then go to XLA's own matmul runtime)
NO_YNN_FUSIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def inference(backend: str | None = None) -> dict[str, str] | None:
    """The compile options for an inference-heavy jitted function on `backend` (default: JAX's default
    backend): `NO_YNN_FUSIONS` on CPU when this jaxlib accepts it, else None."""
    backend = backend or jax.default_backend()
    if backend != "cpu" or any(name in os.environ.get("XLA_FLAGS", "") for name in NO_YNN_FUSIONS):
        return None
    try:  # an option an older or newer XLA does not know fails the compile: ask once, on a scalar
        jax.jit(jnp.negative, compiler_options=NO_YNN_FUSIONS).lower(jnp.float32(0)).compile()
    except Exception:  # noqa: BLE001 — any refusal means: compile with the defaults
        return None
    return dict(NO_YNN_FUSIONS)
