"""Input sources of `bat-jax prepare`: a folder of audio files, a TFDS dataset, the synthetic dataset.

Each source plans into a `SourcePlan` (base.py): per split, the clips to compute (`ClipTask`), the inputs
rejected while listing (`Skipped`) and a picklable loader run in the worker processes.

    folder.py      every audio file under a folder (FileLoader: bat_jax.audio.load); labels_csv.py its CSV,
                   events_csv.py its sound events CSV (--events-csv)
    synthetic.py   the built-in synthetic dataset (SyntheticLoader: bat_jax.audio.synthetic.make_clip)
    items.py       any random-access data source of dicts (ItemLoader), the tfds.data_source protocol
    tfds.py        a prepared TFDS dataset, with tfds.data_source or TensorFlow-free (TfFreeTfdsSource)
"""

from bat_jax.data.sources.base import (
    RESAMPLE_TYPE,
    SAMPLE_RATE,
    ClipTask,
    Skipped,
    SourceError,
    SourcePlan,
    SplitPlan,
    read_vocabulary,
    resample,
    to_float_wave,
)
from bat_jax.data.sources.events_csv import EVENTS_COLUMNS, NO_EVENTS, ClipEvents, read_events_csv
from bat_jax.data.sources.folder import AUDIO_EXTENSIONS, FileLoader, folder_source
from bat_jax.data.sources.items import ItemLoader, items_source, labels_of
from bat_jax.data.sources.labels_csv import CSV_COLUMNS, LABEL_SEPARATOR, read_labels_csv
from bat_jax.data.sources.synthetic import SYNTHETIC_EVAL_INDEX, SyntheticLoader, synthetic_source
from bat_jax.data.sources.tfds import (
    TFDS_SPLIT_FILE_FORMAT,
    TfdsOpener,
    TfFreeTfdsSource,
    find_tfds_dir,
    tensorflow_installed,
    tfds_source,
)

__all__ = [
    "AUDIO_EXTENSIONS",
    "CSV_COLUMNS",
    "EVENTS_COLUMNS",
    "LABEL_SEPARATOR",
    "NO_EVENTS",
    "RESAMPLE_TYPE",
    "SAMPLE_RATE",
    "SYNTHETIC_EVAL_INDEX",
    "TFDS_SPLIT_FILE_FORMAT",
    "ClipEvents",
    "ClipTask",
    "FileLoader",
    "ItemLoader",
    "Skipped",
    "SourceError",
    "SourcePlan",
    "SplitPlan",
    "SyntheticLoader",
    "TfFreeTfdsSource",
    "TfdsOpener",
    "find_tfds_dir",
    "folder_source",
    "items_source",
    "labels_of",
    "read_events_csv",
    "read_labels_csv",
    "read_vocabulary",
    "resample",
    "tensorflow_installed",
    "synthetic_source",
    "tfds_source",
    "to_float_wave",
]
