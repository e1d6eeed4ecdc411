"""The shard record format: version 2 writes `spec`, version 1 (`features`) still reads, bad bytes are
refused."""

import msgpack
import numpy as np
import pytest

from bat_jax.data import records


def _clip(seed=0):
    spec = np.random.default_rng(seed).uniform(0, 1, (7, 4)).astype(np.float16)  # [frames, F]
    return records.Clip(spec, 5, "a/b.wav", (3, 1))


def test_version_2_round_trip_names_the_spectrogram_spec():
    clip = _clip()
    raw = records.encode(clip)
    stored = msgpack.unpackb(raw, raw=False)
    assert stored["v"] == records.FORMAT_VERSION == 2
    assert "spec" in stored and "features" not in stored
    out = records.decode(raw)
    assert sorted(out) == ["clip_id", "labels", "num_frames", "spec"]
    np.testing.assert_array_equal(out["spec"], clip.spec)
    assert out["spec"].dtype == np.float16 and out["num_frames"] == 5 and out["clip_id"] == "a/b.wav"
    np.testing.assert_array_equal(out["labels"], [3, 1])
    assert records.Clip(clip.spec, 5, "x").spec is clip.spec  # positional order kept: spec first


def test_version_1_records_with_features_key_still_decode():
    spec = _clip(1).spec
    v1 = msgpack.packb(
        {
            "v": 1,
            "features": spec.tobytes(),
            "shape": [7, 4],
            "num_frames": 7,
            "clip_id": "old",
            "labels": [0],
        },
        use_bin_type=True,
    )
    out = records.decode(v1)
    np.testing.assert_array_equal(out["spec"], spec)
    assert out["num_frames"] == 7 and out["clip_id"] == "old"


def test_unknown_version_is_refused_with_the_versions_read():
    bad = msgpack.packb({"v": 3, "spec": b"", "shape": [0, 0]}, use_bin_type=True)
    with pytest.raises(
        ValueError, match=r"unknown shard record version 3; this bat-jax reads versions \[1, 2\]"
    ):
        records.decode(bad)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (b"\xc1\xc1garbage", "expected a msgpack shard record, found undecodable bytes"),
        (msgpack.packb([1, 2]), "expected a msgpack map as shard record, found a list"),
        (msgpack.packb({"v": 2, "spec": b"\0" * 8}), r"expected keys \['shape', 'num_frames'"),
        (
            msgpack.packb(
                {"v": 2, "spec": b"\0" * 6, "shape": [2, 2], "num_frames": 2, "clip_id": "c", "labels": []},
                use_bin_type=True,
            ),
            r"found shape \[2, 2\] with 6 bytes",
        ),
        (
            msgpack.packb(
                {"v": 2, "spec": b"\0" * 8, "shape": [2, 2], "num_frames": 3, "clip_id": "c", "labels": []},
                use_bin_type=True,
            ),
            r"expected num_frames in \[1, 2\] \(the spectrogram's frames\), found 3",
        ),
    ],
)
def test_bytes_that_are_not_a_record_are_refused(record, message):
    with pytest.raises(ValueError, match=message):
        records.decode(record)
