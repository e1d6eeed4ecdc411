"""Two pieces of the CGP probe step on CPU, each against the formulation it replaced, in one process with the
variants alternated (medians over rounds):

    python -m benchmarks.cpu_probe_parts          # 16 clips, 512 patch tokens, 1,000 prototypes, 192 wide

- pooling: the min / max token-prototype similarities and their arg-min / arg-max tokens (what the sparse
  backward keeps; `bat_jax.models.pooling`): the job's (chunks of groups whose similarities stay in cache,
  arg as the first token equal to the max) vs the same in one chunk vs the former one-chunk
  `jnp.argmax` / `jnp.argmin` + gather;
- attention: the encoder's multi-head attention forward at 513 tokens, 3 heads (`bat_jax.models.layers`), its
  scores keys-major (CPU's order) vs queries-major (the former order, the accelerators').

Compiled with the probe job's options (`xla_options.inference(encoder_dtype=…)`; ``--dtype bfloat16`` for
the attention in bf16); prints one JSON line of medians (ms).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bat_jax.models import layers, pooling, xla_options


def _argmax_gather(x: jax.Array, p: jax.Array) -> tuple:
    """The former forward: dense similarities, XLA's variadic arg-max / arg-min reductions, then gathers."""
    sim = jnp.einsum("gmd,kd->gmk", x, p)
    i_hi, i_lo = jnp.argmax(sim, axis=1), jnp.argmin(sim, axis=1)
    hi = jnp.take_along_axis(sim, i_hi[:, None], axis=1)[:, 0]
    lo = jnp.take_along_axis(sim, i_lo[:, None], axis=1)[:, 0]
    return lo, hi, i_lo, i_hi


def _compile(fn: Callable, *args: jax.Array, dtype: str = "float32") -> Callable:
    """Traced now (a fresh wrapper each call: jax.jit's trace cache would return an earlier variant's)."""
    options = xla_options.inference(encoder_dtype=dtype)
    return jax.jit(lambda *a: fn(*a), compiler_options=options).lower(*args).compile()


def _time(fns: dict[str, Callable], args: tuple, rounds: int, iters: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            jax.block_until_ready(fn(*args))  # warm
            for _ in range(iters):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times[name].append(time.perf_counter() - t0)
    return {name: round(1e3 * float(np.median(ts)), 2) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16, help="clips (pooling groups, attention rows)")
    ap.add_argument("--tokens", type=int, default=512, help="patch tokens per clip (attention adds CLS)")
    ap.add_argument("--prototypes", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="attention's q, k, v")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5, help="timed calls per variant and round")
    args = ap.parse_args(argv)
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (args.batch, args.tokens, args.dim))
    p = jax.random.normal(keys[1], (args.prototypes, args.dim))

    def job(x, p):
        return pooling._pool(x, p, None, True, True)

    whole_budget = args.batch * args.tokens * args.prototypes * 4
    pool_fns = {"job_chunks": _compile(job, x, p), "argmax_gather": _compile(_argmax_gather, x, p)}
    saved = pooling.SIM_CHUNK_BYTES
    pooling.SIM_CHUNK_BYTES = whole_budget  # traced now: all groups in one chunk
    try:
        pool_fns["one_chunk"] = _compile(job, x, p)
    finally:
        pooling.SIM_CHUNK_BYTES = saved
    ref = pool_fns["argmax_gather"](x, p)
    for name, fn in pool_fns.items():  # the same values and the same arg tokens (no ties in random data)
        for a, b in zip(fn(x, p), ref, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)

    shape = (args.batch, args.tokens + 1, args.heads, args.dim // args.heads)
    q, k, v = (jax.random.normal(key, shape).astype(args.dtype) for key in keys[2:])
    attn_fns = {}
    saved_axes = layers._scores_axes
    for order in ("bhkq", "bhqk"):
        layers._scores_axes = lambda order=order: order  # read at trace time
        try:
            attn_fns[order] = _compile(layers.attention, q, k, v, dtype=args.dtype)
        finally:
            layers._scores_axes = saved_axes
    tol = 1e-5 if args.dtype == "float32" else 2e-2
    a, b = (np.asarray(attn_fns[o](q, k, v), np.float32) for o in ("bhkq", "bhqk"))
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)

    dev = jax.devices()[0]
    result = {
        "device": f"{dev.platform}: {dev.device_kind}",
        "xla_options": xla_options.inference(),
        "pooling_ms": _time(pool_fns, (x, p), args.rounds, args.iters),
        "pooling_shape": {"groups": args.batch, "tokens": args.tokens, "prototypes": args.prototypes},
        "attention_ms": _time(attn_fns, (q, k, v), args.rounds, args.iters),
        "attention_shape": list(shape),
        "attention_dtype": args.dtype,
        "attention_xla_options": xla_options.inference(encoder_dtype=args.dtype),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
