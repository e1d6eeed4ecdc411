"""Worker of tests/data/test_pipeline.py::test_two_real_processes: one JAX process of a 2-process CPU job.

Usage: python tests/data/_pipeline_two_process.py PROCESS_ID PORT SHARD_DIR OUT_JSON
"""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

GLOBAL_BATCH = 8
TARGET_FRAMES = 32
NUM_BATCHES = 2


def main(process_id: int, port: int, shard_dir: str, out_json: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
    )
    from bat_jax.data import pipeline

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    loader = pipeline.make_pretrain_loader(
        pipeline.shard_paths(shard_dir, "train"),
        global_batch_size=GLOBAL_BATCH,
        target_frames=TARGET_FRAMES,
        sharding=sharding,
        seed=3,
    )
    total = jax.jit(lambda x: jnp.sum(x), out_shardings=NamedSharding(mesh, PartitionSpec()))
    out = {"clip_index": [], "num_frames": [], "global_num_frames_sum": [], "shapes": [], "specs": []}
    for _ in range(NUM_BATCHES):
        batch = next(loader)
        out["shapes"].append({key: list(value.shape) for key, value in batch.items()})
        out["specs"].append(batch["spec"].sharding.spec[0])
        for key in ("clip_index", "num_frames"):
            shards = sorted(batch[key].addressable_shards, key=lambda s: s.index[0].start)
            out[key] += np.concatenate([np.asarray(s.data) for s in shards]).tolist()
        out["global_num_frames_sum"].append(int(total(batch["num_frames"])))
    out["process_count"] = jax.process_count()
    with open(out_json, "w") as f:
        json.dump(out, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
