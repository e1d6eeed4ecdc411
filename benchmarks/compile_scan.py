"""Compile time of BAT-B's 12 encoder blocks: a Python loop over the blocks (what bat_jax.models.encoder does)
against `nn.scan` over one block with stacked parameters (issue 9 §1). Both compute every block's output (the
teacher's targets and the probes read them all) in the forward and backward of a scalar loss, jitted.

    python -m benchmarks.compile_scan                       # this machine's backend (CPU here)
    python -m benchmarks.compile_scan --topology v5p:2x2x1  # a TPU slice (libtpu's compile-only client)

Reported per variant (alternated over --rounds): lowering and compile seconds, and on a real backend the
step time (the TPU topology is compile-only). Tokens [batch, 513, 768] float32 (or --dtype bfloat16).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bat_jax.models.layers import Block


class Loop(nn.Module):
    depth: int
    dim: int
    heads: int
    dtype: str

    @nn.compact
    def __call__(self, x):
        outs = []
        for i in range(self.depth):
            x = Block(self.dim, self.heads, dtype=self.dtype, name=f"blocks_{i}")(x)
            outs.append(x)
        return jnp.stack(outs)  # [L, B, N, D]


class _ScanBlock(nn.Module):
    dim: int
    heads: int
    dtype: str

    @nn.compact
    def __call__(self, x, _):
        x = Block(self.dim, self.heads, dtype=self.dtype, name="block")(x)
        return x, x


class Scan(nn.Module):
    depth: int
    dim: int
    heads: int
    dtype: str

    @nn.compact
    def __call__(self, x):
        scanned = nn.scan(
            _ScanBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.depth,
            metadata_params={nn.PARTITION_NAME: "layers"},  # the stacked axis of the boxed parameters
        )(self.dim, self.heads, self.dtype, name="blocks")
        _, outs = scanned(x, None)
        return outs  # [L, B, N, D]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=513)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--topology", default=None, help="a TPU slice, e.g. v5p:2x2x1 (compile only)")
    a = p.parse_args()
    devices = None
    if a.topology:
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        from bat_jax.train.compile_check import topology_devices

        devices = topology_devices(a.topology)
    x_shape = (a.batch, a.tokens, a.dim)
    rows = []
    for r in range(a.rounds):
        for name, cls in (("loop", Loop), ("scan", Scan)):
            model = cls(a.depth, a.dim, a.heads, a.dtype)
            params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(x_shape, jnp.float32))

            def loss(params, x, model=model):
                return jnp.mean(jnp.square(model.apply(params, x).astype(jnp.float32)))

            step = jax.jit(jax.value_and_grad(loss))
            x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
            if devices is not None:
                from jax.sharding import Mesh, NamedSharding, PartitionSpec

                mesh = Mesh(np.array(devices), ("data",))
                rep = NamedSharding(mesh, PartitionSpec())
                params = jax.tree.map(
                    lambda s, rep=rep: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), params
                )
                x = jax.ShapeDtypeStruct(
                    x_shape, jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("data"))
                )
            t0 = time.perf_counter()
            lowered = step.lower(params, x)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
            row = {"round": r, "variant": name, "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2)}
            if devices is None:
                real = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
                xs = jnp.ones(x_shape, jnp.float32)
                jax.block_until_ready(compiled(real, xs))
                t = time.perf_counter()
                jax.block_until_ready(compiled(real, xs))
                row["step_s"] = round(time.perf_counter() - t, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    backend = a.topology or jax.default_backend()
    summary = {}
    for name in ("loop", "scan"):
        mine = [r for r in rows if r["variant"] == name]
        summary[name] = {k: float(np.median([r[k] for r in mine])) for k in mine[0] if k.endswith("_s")}
    print(
        json.dumps({"backend": backend, "depth": a.depth, "dim": a.dim, "batch": a.batch, "median": summary})
    )


if __name__ == "__main__":
    main()
