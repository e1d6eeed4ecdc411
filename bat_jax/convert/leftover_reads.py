"""Silence the leftovers of a failed Orbax restore, and nothing else.

When Orbax cannot restore a damaged params/ folder, the first TensorStore read's error propagates (and
becomes our one-line `CheckpointError`), but the other reads of the same restore are still in flight or
already failed, and nobody will ever look at them. They report in two ways, late and unpredictably:

- a read that completes after Orbax's event loop closed raises RuntimeError('Event loop is closed') in
  asyncio's `call_soon_threadsafe`, printed through `sys.unraisablehook`;
- a read's task or future that failed with nobody awaiting it sits in a reference cycle, and when the
  garbage collector finalizes it asyncio logs "Task exception was never retrieved" / "Future exception was
  never retrieved" with the TensorStore ValueError (naming the folder) on the `asyncio` logger.

`reads_dropped(where)` drops exactly those reports while a restore of `where` runs and, when it fails,
waits for the in-flight reads and collects the cycles before it puts everything back. A command's own
process (`bat-jax convert`) also calls `drop_until_exit`: its one-line error must be the last line.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

UNRETRIEVED = ("Task exception was never retrieved", "Future exception was never retrieved")
TENSORSTORE_MARK = "tensorstore_spec="  # every TensorStore open/read error ends with its spec


def is_undeliverable_read(unraisable: Any) -> bool:
    """RuntimeError('Event loop is closed') raised by asyncio's call_soon_threadsafe."""
    exc = unraisable.exc_value
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
        return False
    return any(frame.name == "call_soon_threadsafe" for frame in traceback.extract_tb(exc.__traceback__))


def is_unretrieved_read(record: logging.LogRecord, mark: str) -> bool:
    """asyncio's report of a failed task/future nobody awaited whose ValueError contains `mark`."""
    exc = record.exc_info[1] if record.exc_info else None
    first_line = str(record.msg).split("\n", 1)[0]
    return first_line in UNRETRIEVED and isinstance(exc, ValueError) and mark in str(exc)


class UnretrievedReadFilter(logging.Filter):
    """Drops `is_unretrieved_read(record, mark)` records from the `asyncio` logger."""

    def __init__(self, mark: str):
        super().__init__()
        self.mark = mark

    def filter(self, record: logging.LogRecord) -> bool:
        return not is_unretrieved_read(record, self.mark)


def _dropping_hook(previous: Callable[[Any], Any], on_drop: Callable[[], None]) -> Callable[[Any], Any]:
    """An unraisable hook that drops undeliverable TensorStore reads (calling `on_drop`) and hands every
    other report on to `previous`."""

    def hook(unraisable: Any) -> None:
        if is_undeliverable_read(unraisable):
            on_drop()
        else:
            previous(unraisable)

    hook.drops_undeliverable_reads = True  # type: ignore[attr-defined]
    return hook


@contextlib.contextmanager
def reads_dropped(where: str, quiet_s: float = 0.05, max_wait_s: float = 1.0) -> Iterator[None]:
    """While inside, drop the leftover reports of a failed restore of the folder `where` (see the module
    doc); every other report reaches the previous hook / handlers. When the body fails: wait until no
    undeliverable read came for `quiet_s` (measured: they all arrive within ~5 ms), at most `max_wait_s`,
    then collect garbage so that the failed reads' tasks are finalized (and their reports dropped) now,
    not at some later collection or at exit; then put the previous hook and filters back."""
    previous = sys.unraisablehook
    last_drop = [time.monotonic()]
    hook = _dropping_hook(previous, lambda: last_drop.__setitem__(0, time.monotonic()))
    sys.unraisablehook = hook
    log_filter = UnretrievedReadFilter(where)
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addFilter(log_filter)
    try:
        yield
    except BaseException:
        start = last_drop[0] = time.monotonic()
        while time.monotonic() - last_drop[0] < quiet_s and time.monotonic() - start < max_wait_s:
            time.sleep(quiet_s / 10)
        gc.collect()
        raise
    finally:
        asyncio_logger.removeFilter(log_filter)
        if sys.unraisablehook is hook:  # somebody else may have installed theirs meanwhile: keep it
            sys.unraisablehook = previous


def drop_until_exit() -> None:
    """Drop the leftover reports of any failed TensorStore read for the rest of the process (once). Only
    for a command's own process (`bat-jax convert`); a library call (load_encoder) uses `reads_dropped`."""
    if not getattr(sys.unraisablehook, "drops_undeliverable_reads", False):
        sys.unraisablehook = _dropping_hook(sys.unraisablehook, lambda: None)
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, UnretrievedReadFilter) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(UnretrievedReadFilter(TENSORSTORE_MARK))
