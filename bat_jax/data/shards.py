"""Shard files of `bat-jax prepare`: names, the assignment of clips to shards, atomic writes, resume state.

Layout under an output folder OUT:
    OUT/<split>/<split>-00000-of-00004.arrayrecord  the shards (ArrayRecord, one record per clip)
    OUT/manifest.json                               written last, from the state below
    OUT/.progress/global.json                       settings shared by all splits (front-end, vocabulary...)
    OUT/.progress/<split>/split.json                the split's settings and inputs rejected while listing
    OUT/.progress/<split>/<shard>.done.json         per finished shard: record count, size, sha256, skipped
                                                    inputs and notes
    OUT/.progress/<split>/part-I-of-N.json          per finished part of a `--part I/N` run: its shards
                                                    (digests, counts), skipped inputs, timing
    OUT/.progress/lock                              held (flock) while a run writes OUT (shared by parts)

A shard is written to `<shard>.tmp`, renamed when complete, and only then gets its `.done.json`; a shard
counts as done when both exist and agree (settings digest, size, sha256 of the file, record count).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

SHARD_SUFFIX = ".arrayrecord"
# One record per chunk (fast random access), uncompressed: fp16 spectrograms shrink only ~27% with zstd or
# brotli, while decompression makes random reads 3-4x slower (benchmarks/RESULTS.md), and the input
# pipeline, not the disk, is what must keep up with the accelerators.
WRITER_OPTIONS = "group_size:1,uncompressed"
PROGRESS_DIR = ".progress"
MANIFEST = "manifest.json"
DONE_SUFFIX = ".done.json"
HASH_BLOCK = 1 << 20  # bytes read at a time when hashing a shard
HASH_THREADS = 8  # shards hashed at once by `hashing` (resume, verify)


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def plan_shards(
    num_clips: int, *, clips_per_shard: int | None = None, num_shards: int | None = None
) -> list[range]:
    """Contiguous ranges of clip positions, one per shard, fixed by the counts alone (deterministic).

    clips_per_shard: shards of that many clips (the last one shorter). num_shards: that many shards (at most
    one per clip) whose sizes differ by at most one.
    """
    if (clips_per_shard is None) == (num_shards is None):
        raise ValueError("plan_shards: expected exactly one of clips_per_shard or num_shards")
    if num_clips == 0:
        return []
    if num_shards is not None:
        if num_shards < 1:
            raise ValueError(f"--num-shards: expected N >= 1, found {num_shards}")
        count = min(num_shards, num_clips)
        bounds = [round(i * num_clips / count) for i in range(count + 1)]
        return [range(bounds[i], bounds[i + 1]) for i in range(count)]
    if clips_per_shard < 1:
        raise ValueError(f"--clips-per-shard: expected N >= 1, found {clips_per_shard}")
    count = math.ceil(num_clips / clips_per_shard)
    return [range(i * clips_per_shard, min(num_clips, (i + 1) * clips_per_shard)) for i in range(count)]


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temporary file, fsync, rename). The temporary file's name is unique to this
    process, so parts of one `--part I/N` job writing the same file (same content) never mix their bytes."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when it is missing or unreadable (an interrupted write)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks (memory stays flat for any shard size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def hashing(paths: Iterable[Path]) -> Iterator[Callable[[Path], str]]:
    """A `sha256_file` whose answers for `paths` are computed ahead, HASH_THREADS at a time (hashlib releases
    the GIL, so threads read and hash in parallel); asking for a path waits for its hash only, so the order
    in which the caller reports stays its own. A path that was not given is hashed on the spot."""
    paths = list(dict.fromkeys(paths))
    if not paths:
        yield sha256_file
        return
    pool = concurrent.futures.ThreadPoolExecutor(min(HASH_THREADS, len(paths)), "sha256")
    try:
        futures = {path: pool.submit(sha256_file, path) for path in paths}
        yield lambda path: futures[path].result() if path in futures else sha256_file(path)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def count_records(path: Path) -> int:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    try:
        return int(reader.num_records())
    finally:
        reader.close()


class ShardWriter:
    """Writes records to `<path>.tmp`; `commit()` closes it and renames it to `path` (atomic on POSIX)."""

    def __init__(self, path: Path):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self._writer = ArrayRecordWriter(str(self.tmp), WRITER_OPTIONS)
        self.num_records = 0

    def write(self, record: bytes) -> None:
        self._writer.write(record)
        self.num_records += 1

    def commit(self) -> int:
        """Close, rename into place, return the file size in bytes."""
        self._writer.close()
        os.replace(self.tmp, self.path)
        return self.path.stat().st_size

    def abort(self) -> None:
        """Close and delete the partial `<path>.tmp` (an interrupted shard leaves nothing behind)."""
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - the partial .tmp is deleted below or rewritten by the next run
            pass
        self.tmp.unlink(missing_ok=True)


def file_problems(
    path: Path,
    num_bytes: int | None,
    sha256: str | None,
    num_records: int | None,
    *,
    listed_in: str,
    hash_of: Callable[[Path], str] = sha256_file,
    count: Callable[[Path], int] = count_records,
) -> Iterator[str]:
    """What is wrong with the shard file `path` against what `listed_in` records (its size, sha256, record
    count), lazily, in this order: missing (then nothing else), size, checksum, unreadable (then nothing
    else), record count. `num_bytes` None skips the size check. `hash_of` and `count` give the file's sha256
    and record count (e.g. hashed ahead by `hashing`, or counted while decoding every record)."""
    if not path.is_file():
        yield f"missing (listed in {listed_in})"
        return
    size = path.stat().st_size
    if num_bytes is not None and size != num_bytes:
        yield f"size {size} bytes, {listed_in} says {num_bytes}"
    if not sha256:
        yield f"no sha256 in {listed_in} (prepared by an older bat-jax?)"
    else:
        try:
            found = hash_of(path)
        except OSError as e:
            yield f"not readable: {type(e).__name__}: {e}"
            return
        if found != sha256:
            yield f"checksum mismatch: sha256 {found[:16]}..., {listed_in} says {sha256[:16]}..."
    try:
        records = count(path)
    except Exception as e:  # noqa: BLE001 - an unreadable shard is a problem, not a crash
        yield f"not a readable ArrayRecord file: {type(e).__name__}: {e}"
        return
    if records != num_records:
        yield f"{records} records, {listed_in} says {num_records}"


def shard_problem(
    shard: Path, done: dict | None, config_digest: str, hash_of: Callable[[Path], str] = sha256_file
) -> str | None:
    """Why `shard` is not complete (None when it is): its .done.json must match the settings, and the file its
    size, sha256 and record count (file_problems: the first problem found). A shard never finished gives
    "not written"; one whose bytes changed (bit rot, a bad copy) gives the checksum it has against the
    recorded one."""
    if not done or done.get("config_digest") != config_digest or not shard.is_file():
        return "not written"
    problems = file_problems(
        shard,
        done.get("bytes"),
        done.get("sha256"),
        done.get("num_records"),
        listed_in="its .done.json",
        hash_of=hash_of,
    )
    return next(problems, None)


def shard_done(shard: Path, done: dict | None, config_digest: str) -> bool:
    """True when `shard` is complete (see shard_problem)."""
    return shard_problem(shard, done, config_digest) is None


class OutputLock:
    """A flock on OUT/.progress/<name>, so two runs never write the same output at once: exclusive (a run of
    the whole command, `--merge`), or shared (the parts of a `--part I/N` run, which write disjoint shards
    and also hold an exclusive lock of their own, `lock-part-I-of-N`). Only one host's runs see each other's
    locks unless the shared disk supports flock."""

    def __init__(
        self, out: Path, name: str = "lock", shared: bool = False, holder: str = "`bat-jax prepare`"
    ):
        self.path = out / PROGRESS_DIR / name
        self.shared = shared
        self.holder = holder  # who holds it when it is taken, for the message
        self._file = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            return self
        try:
            fcntl.flock(
                self._file.fileno(), (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
            )
        except OSError as e:
            self._file.close()
            raise RuntimeError(
                f"another {self.holder} is writing {self.path.parent.parent} (lock {self.path} is held); "
                "wait for it to finish"
            ) from e
        return self

    def __exit__(self, *exc):
        if self._file is not None:
            self._file.close()


def remove_split(out: Path, split: str) -> None:
    """Delete what `prepare` wrote for `split`: its shards (and .tmp files) and its progress state."""
    folder = out / split
    if folder.is_dir():
        for f in folder.iterdir():
            if f.name.startswith(f"{split}-") and (f.name.endswith(SHARD_SUFFIX) or f.name.endswith(".tmp")):
                f.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()
    shutil.rmtree(out / PROGRESS_DIR / split, ignore_errors=True)


def progress_splits(out: Path) -> list[str]:
    """Splits that have progress state in OUT (finished or not), sorted."""
    root = out / PROGRESS_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "split.json").is_file())
