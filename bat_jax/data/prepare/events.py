"""`prepare --events-csv FILE` / `--synthetic-events`: sound-event annotations in the records, and the
manifest's per-split "events" entry.

Each clip's events (onset s, offset s, class index) go into its record (`events`, see
bat_jax.data.records): from the events CSV through its task (sources/events_csv.py, folder.py), or from the
synthetic loader (bat_jax.audio.synthetic.make_clip_events). Every split whose records carry them gets,
counted over its written records:

    "events": {"source": "events_csv", "file": "/abs/events.csv",
               "column_names": ["path", "onset", "offset", "label"],
               "num_events": 412, "num_clips_without_events": 3}
    "events": {"source": "synthetic", "num_events": 96, "num_clips_without_events": 0}

The split's source description says which (`events_csv` and `events_columns`, or `synthetic_events`), so
resuming an output made without events, or from another file, is refused; an output made without them has
neither the keys nor the entry. The loaders turn events into frame-wise targets (bat_jax.data.events).
"""

from __future__ import annotations

EVENTS_FIELD = (
    "list[[onset, offset, class]]: the clip's sound events in seconds from its start, class = index into "
    "label_vocabulary (--events-csv / --synthetic-events; decoded as event_times float32 [k, 2] and "
    "event_classes int32 [k]; also splits.<split>.events)"
)


def events_source(description: dict) -> dict | None:
    """The manifest's "events" entry less its counts, from a split's source description; None without
    events."""
    if description.get("events_csv") is not None:
        return {
            "source": "events_csv",
            "file": description["events_csv"],
            "column_names": list(description["events_columns"]),
        }
    if description.get("synthetic_events"):
        return {"source": "synthetic"}
    return None


def events_entry(source: dict, num_events: int, num_clips_without_events: int) -> dict:
    """The manifest's per-split "events" entry (module docstring)."""
    return {**source, "num_events": num_events, "num_clips_without_events": num_clips_without_events}
