"""Teacher features in the store: rows of logits + feature bytes keep every guarantee (compaction, checksums,
verify, repair), and a cache without features keeps the identity it had before features existed."""

import hashlib
import json

import numpy as np
import pytest
import torch

from lightning_kd.cache import CacheCorruptedError, CacheSpec, TeacherCache
from lightning_kd.cache import format as fmt
from lightning_kd.cache.repair import repair
from lightning_kd.cache.spec import FeatureSpec
from lightning_kd.cache.verify import verify
from lightning_kd.data.plan import open_cache

FEATURES = (FeatureSpec("map", "layer2", (2, 3, 3)), FeatureSpec("pool", "avgpool", (5,)))


def test_a_cache_without_features_keeps_its_identity_and_default_directory(tmp_path, monkeypatch):
    spec = CacheSpec("teacher", "data", "view", 10, "float16")
    before = {"teacher": "teacher", "dataset": "data", "view": "view", "num_classes": 10, "dtype": "float16",
              "topk": None}  # the identity written before features existed
    assert spec.to_dict() == before and repr(spec) == (
        "CacheSpec(teacher='teacher', dataset='data', view='view', num_classes=10, dtype='float16', topk=None)")
    monkeypatch.setenv("LKD_CACHE_DIR", str(tmp_path))
    cache = open_cache(spec, None, None)
    key = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert cache.directory == tmp_path / "teacher_outputs" / key
    assert json.loads((cache.directory / "manifest.json").read_text()) == {"format_version": 2, **before}
    with_features = CacheSpec("teacher", "data", "view", 10, "float16", features=FEATURES, feature_dtype="float16")
    assert open_cache(with_features, None, None).directory != cache.directory


@pytest.mark.parametrize("dtype, topk, feature_dtype", [("float32", None, "float16"), ("float16", None, "float32"),
                                                        ("topk", 3, "float16")])
def test_features_round_trip_through_compaction_and_a_reopen(tmp_path, dtype, topk, feature_dtype):
    spec = CacheSpec("t", "d", "v", 10, dtype, topk, FEATURES, feature_dtype)
    cache = TeacherCache(tmp_path, spec)
    g = torch.Generator().manual_seed(0)
    logits, maps, pools = torch.randn(50, 10, generator=g), torch.randn(50, 2, 3, 3, generator=g), torch.randn(50, 5)
    cache.write(np.arange(0, 50, 2), logits[::2], {"map": maps[::2], "pool": pools[::2]})
    cache.write(np.arange(1, 50, 2), logits[1::2], {"map": maps[1::2], "pool": pools[1::2]})
    order = np.random.default_rng(0).permutation(50)
    before = cache.get_features(order), cache.get(order)
    want = {"map": maps[order], "pool": pools[order]}
    for name, t in before[0].items():
        exact = want[name].to(getattr(torch, feature_dtype)).float()
        assert torch.equal(t, exact), name  # the stored value is the feature rounded to feature_dtype
    assert cache.compact()
    reopened = TeacherCache(tmp_path, spec)
    after = reopened.get_features(order), reopened.get(order)
    assert all(torch.equal(before[0][n], after[0][n]) for n in want) and torch.equal(before[1], after[1])
    if dtype == "float32":
        assert torch.equal(after[1], logits[order])  # the logits are untouched by the features beside them


def test_damaged_feature_bytes_fail_their_chunk_and_repair_keeps_every_other_row(tmp_path):
    spec = CacheSpec("t", "d", "v", 10, "float32", features=FEATURES, feature_dtype="float16")
    cache = TeacherCache(tmp_path, spec)
    features = {"map": torch.randn(1500, 2, 3, 3), "pool": torch.randn(1500, 5)}
    cache.write(np.arange(1500), torch.randn(1500, 10), features)
    kept = cache.get_features(np.arange(1024))
    (seg,) = (tmp_path / "segments").glob("*.seg")
    block = fmt.scan(seg).blocks[0]
    at = block.layout()["values"][0] + 1200 * block.width * 4 + spec.feature_offsets()[1][1]  # row 1200's "pool"
    data = bytearray(seg.read_bytes())
    data[at] ^= 0x01
    seg.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptedError, match="rows 1024..1500 fail their checksum"):
        TeacherCache(tmp_path, spec)
    assert (verify(tmp_path).intact, verify(tmp_path).damaged) == (1024, 476)
    assert repair(tmp_path).kept == 1024
    repaired = TeacherCache(tmp_path, spec)
    assert len(repaired) == 1024
    assert all(torch.equal(repaired.get_features(np.arange(1024))[n], kept[n]) for n in kept)


def test_outputs_without_the_specs_features_are_refused_before_anything_is_stored(tmp_path):
    cache = TeacherCache(tmp_path, CacheSpec("t", "d", "v", 10, features=FEATURES, feature_dtype="float16"))
    good = {"map": torch.randn(4, 2, 3, 3), "pool": torch.randn(4, 5)}
    with pytest.raises(ValueError, match=r"stores teacher features \['map', 'pool'\], the teacher gave \[\]"):
        cache.write(np.arange(4), torch.randn(4, 10))
    with pytest.raises(ValueError, match=r"'pool' has shape \(4, 6\), expected \(4, 5\)"):
        cache.write(np.arange(4), torch.randn(4, 10), {**good, "pool": torch.randn(4, 6)})
    with pytest.raises(ValueError, match="'map' has NaN/inf"):
        cache.write(np.arange(4), torch.randn(4, 10), {**good, "map": good["map"].index_fill(0, torch.tensor([1]),
                                                                                          float("nan"))})
    logits_only = TeacherCache(tmp_path / "plain", CacheSpec("t", "d", "v", 10))
    with pytest.raises(ValueError, match=r"stores teacher features \[\], the teacher gave \['map', 'pool'\]"):
        logits_only.write(np.arange(4), torch.randn(4, 10), good)
    assert len(cache) == 0 and len(logits_only) == 0 and not list((tmp_path / "segments").glob("*.seg"))
