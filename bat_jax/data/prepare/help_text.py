"""The help texts of `bat-jax prepare` (bat_jax/data/prepare/cli.py): what it reads, writes and checks, and
examples."""

DESCRIPTION = """\
Decode audio once, compute spectrograms, and write them as ArrayRecord shards plus a manifest that the
training and probing pipelines read.

sources (--source):
  folder     every audio file under --input, recursively (.wav .flac .ogg .mp3 .m4a .aiff .aif), mixed to
             mono and resampled to 16 kHz (soxr_hq). Folders named .* are not entered. Symlinks to folders
             are followed, except a link to a folder above it (skipped as "symlink loop") or a second way
             into a folder already listed ("duplicate folder"). A subfolder that cannot be listed (no read
             permission), a broken symlink, a file that vanished or cannot be stat'ed are skipped, listed
             in the manifest with their reason and counted in the summary; the rest is written. A truncated
             WAV (its header promises more frames than its data holds) is kept and listed as truncated.
             Labels: --labels-csv FILE (rules below), or --labels-from-dir (the folder holding a file names
             its class; refused when no file of a split is inside a subfolder), or none. The vocabulary is
             the sorted set of class names, or --labels-vocab FILE (one name per line, line i = label i).
             Files the CSV does not list are unlabeled (skipped with --require-labels); rows naming missing
             files are skipped. Or sound events: --events-csv FILE (rules below; its events give the labels).
             One split named --split, or with --split-from-subdir one split per subfolder of --input
             (train/, eval/).
  tfds       a TFDS dataset prepared in the array_record format (tfds build NAME --file_format=array_record),
             read with tfds.data_source, or without TensorFlow from its files directly: --tfds-name,
             --tfds-split (comma-separated: one output split each), --tfds-data-dir. Audio from the feature
             --tfds-audio-key (default audio) at its sample_rate (or --tfds-sample-rate), int16 PCM divided by
             32768, resampled to 16 kHz; labels from the ClassLabel or Sequence(ClassLabel) feature
             --tfds-label-key (default label), vocabulary = its class names.
  synthetic  the built-in synthetic dataset (12 classes of sound events, generated from --seed, no
             download): splits train (--num-clips) and eval (--num-eval-clips), --multilabel,
             --min-seconds/--max-seconds; --synthetic-events stores each clip's true events (onset, offset,
             class) in its record, as --events-csv does.

labels CSV (--labels-csv FILE), checked before any work; a CSV breaking a rule is refused:
  - paths are relative to --input; class names in a labels cell are separated by ';' (--label-separator),
    an empty cell means no labels; blank rows are ignored
  - without --csv-columns: exactly two cells per row, path and labels; the first row is the header
    `path,labels` or already a data row whose path has an audio extension (a header like `file,class`
    needs --csv-columns file,class)
  - with --csv-columns PATH,LABELS: the first row is a header naming both columns (case-insensitive; other
    columns are ignored), e.g. ESC-50's meta/esc50.csv with --csv-columns filename,category
  - text in --csv-encoding (default utf-8, a byte-order mark accepted); a byte that does not decode is
    reported with its line; pass e.g. --csv-encoding latin-1
  - when no row names an audio file under --input the run is refused; --allow-unlabelled writes the files
    without labels instead (it also lets --labels-from-dir run on a flat folder)
  - --fold-column NAME stores each clip's cross-validation fold from that column (e.g. ESC-50's fold): the
    header must name it (without --csv-columns the header is path,labels,NAME), every row needs a value;
    integers when every value is one, else strings. A file with no CSV row is skipped ("no fold"). The fold
    goes into each record (fold) and, per split in record order, into the manifest
    (splits.<split>.folds: column, values, num_clips, by_record)

events CSV (--events-csv FILE), sound events for frame-wise targets (sound event detection, e.g. DCASE 2016
task 2), checked before any work; a bad value is refused naming the file and the line:
  - rows path,onset,offset,label: path relative to --input, onset and offset in seconds from the clip's
    start (0 <= onset < offset), label a class name; one row per event, so a path may have many rows
  - a row whose onset, offset and label are all empty ('a.wav,,,') marks an annotated clip without events
  - without --events-columns: exactly four cells per row; the first row is the header path,onset,offset,label
    or already a data row; with --events-columns PATH,ONSET,OFFSET,LABEL: a header naming the four columns
    (other columns ignored). Text in --csv-encoding
  - a clip's labels = the sorted set of its events' classes; the vocabulary = the sorted set of event labels
    (or --labels-vocab); an audio file with no row is skipped ("no events"). Not with --labels-csv or
    --labels-from-dir
  - the events go into each record (events: [[onset, offset, class], ...]) and the manifest counts them per
    split (splits.<split>.events: source, file, column_names, num_events, num_clips_without_events); the
    loaders' frame_labels turn them into targets per time patch (bat_jax.data.frame_targets)

what is written (--out OUT):
  OUT/<split>/<split>-00000-of-0000N.arrayrecord   one record per clip (bat_jax.data.records, msgpack):
        spec float16 [frames, 128], num_frames (true length; zero padding follows), clip_id
        (relative path, TFDS name/split/index or synthetic id), labels (class indices), and fold / events
        when asked for (--fold-column, --events-csv, --synthetic-events)
  OUT/manifest.json   format version, front-end name and all its parameters, sample rate, clip handling,
        label_vocabulary, per split: clips, skipped, notes, frames, hours and the shard list (path, records,
        bytes, sha256); every skipped input with its reason; notes on kept inputs (e.g. a truncated WAV:
        frames read vs header); the command line, bat-jax version and timing
  OUT/.progress/      per-shard completion records (records, bytes, sha256), used to resume
  `bat-jax verify OUT` checks a prepared folder: checksums, every record, counts against the manifest

front-ends (--frontend):
  bat    (default) BAT log-mel (bat_jax.audio.logmel): 1024-point STFT, hop 160, 128 HTK mels, dB with an
         80 dB floor, min-max to [0, 1] per clip
  kaldi  legacy EAT/SSLAM Kaldi fbank (bat_jax.audio.kaldi_fbank), stored raw: the (x - mean) / (2 std)
         dataset normalisation is applied later (bat_jax.audio.normalize_fbank)

clip length (--clip-seconds N): a clip longer than N s is cut to its first N s before the front-end; the
  features of a shorter clip are zero-padded after the front-end (after BAT's min-max, so padding = the
  minimum, as in BAT) to the frame count of N s (bat: N*16000 // 160 + 1; 10.23 s -> 1024 frames).
  num_frames keeps the true length. Default: every clip at its full length.

robustness: unreadable, corrupt, empty and too-short inputs are skipped, listed in the manifest with their
  reason and counted in the summary; the exit status is 1 only when nothing was written, or with --strict
  when anything was skipped. Output is deterministic (sorted inputs, fixed shard ranges, records in input
  order whatever the worker count). Rerunning an interrupted command writes only the missing shards, and
  recomputes a finished shard whose size or sha256 no longer matches its record (the summary names it).
  Ctrl-C (SIGINT) stops between two clips with exit status 130: finished shards are kept, the shard being
  written is dropped; run the same command again to finish.
  An output made with other settings is refused unless --overwrite. Separate runs may add splits to the
  same OUT when the front-end, clip handling and label vocabulary agree (a folder run reuses the
  vocabulary of an existing OUT).

scale: each worker process (--workers) computes and writes whole shards itself (this process only hands
  out shards and collects their checksums), so clips/s grows with the cores; at most one worker per shard
  being written, so give a small dataset enough shards (--clips-per-shard) to keep every worker busy.
  Several machines (--part I/N): run the same command on N machines that see the same --out (a shared
  disk or a mounted bucket), each with its own --part 1/N ... N/N (--workers may differ). The command's
  shards are dealt round-robin over its splits in order (the g-th shard, from 0, belongs to part
  g % N + 1); a part writes its shards and OUT/.progress/<split>/part-I-of-N.json (its shards' sha256,
  counts, skipped inputs, timing), never manifest.json, and resumes like a whole run. A part whose N or
  settings differ from the parts already in OUT is refused. Once every part is done,
  `bat-jax prepare --merge --out OUT` checks them (naming missing parts and the command that makes them)
  and writes manifest.json: the shards and the manifest are byte for byte those of the same command run on
  one machine, except the manifest's command and timing, and each split's command and seconds.
"""

EXAMPLES = """\
examples:
  # the built-in synthetic dataset (train + eval)
  bat-jax prepare --source synthetic --out data/synth --num-clips 2000 --num-eval-clips 500

  # AudioSet from a folder of downloaded 10 s clips and a CSV `path,labels` you write from the segment
  # lists (labels = class names or MIDs separated by ';'); one run per split, same --out
  bat-jax prepare --source folder --input audioset/balanced_train --labels-csv balanced_train.csv \\
      --split train --clip-seconds 10.23 --out data/as20k --workers 8
  bat-jax prepare --source folder --input audioset/eval --labels-csv eval.csv \\
      --split eval --clip-seconds 10.23 --out data/as20k --workers 8

  # ESC-50 straight from its repository layout (meta/esc50.csv has columns filename, fold and category),
  # with its 5 folds for cross-validation
  bat-jax prepare --source folder --input ESC-50/audio --labels-csv ESC-50/meta/esc50.csv \\
      --csv-columns filename,category --fold-column fold --out data/esc50

  # Speech Commands v2 from its folder layout (one folder per word; move _background_noise_ out first,
  # or it becomes a class; the official validation/test lists are not applied: one split)
  bat-jax prepare --source folder --input speech_commands_v0.02 --labels-from-dir --out data/sc2

  # Speech Commands from TFDS (dataset speech_commands: splits train, validation, test)
  bat-jax prepare --source tfds --tfds-name speech_commands --tfds-split train,validation,test \\
      --out data/sc2_tfds
  # (AudioSet and ESC-50 are not in the TFDS catalog; use a folder for them)

  # DCASE 2016 task 2 style sound event detection: a CSV of strong labels, one row per event,
  #   path,onset,offset,label
  #   dev_1.wav,0.51,1.32,speech
  #   dev_1.wav,2.05,2.90,doorslam
  #   dev_2.wav,,,               (annotated, no event)
  bat-jax prepare --source folder --input dcase2016_task2/audio --events-csv dcase2016_task2/events.csv \\
      --split train --out data/dcase2016_t2
  # the synthetic dataset with its true events (frame-wise targets for the cgp_frame probe)
  bat-jax prepare --source synthetic --synthetic-events --out data/synth_sed

  # one dataset on three machines sharing /shared/as2m (same command, --part 1/3, 2/3, 3/3), then merge
  bat-jax prepare --source folder --input audioset/unbalanced_train --labels-csv unbalanced_train.csv \\
      --clip-seconds 10.23 --out /shared/as2m --part 2/3
  bat-jax prepare --merge --out /shared/as2m

  # legacy Kaldi fbank features for EAT / SSLAM checkpoints
  bat-jax prepare --source folder --input ESC-50/audio --labels-csv ESC-50/meta/esc50.csv \\
      --csv-columns filename,category --frontend kaldi --out data/esc50_kaldi
"""
