import numpy as np
import pytest
import torch

from lightning_kd.cache import (
    CacheCorruptedError,
    CacheMismatchError,
    CacheSpec,
    TeacherCache,
    decode_topk,
    encode_topk,
)

SPEC = CacheSpec(teacher="sha256:t", dataset="d", view="clean(raw)", num_classes=10)


def _fill(cache, n=30, chunk=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, cache.spec.num_classes, generator=g) * 5
    idx = np.random.default_rng(seed).permutation(1000)[:n]
    for s in range(0, n, chunk):
        cache.write(idx[s : s + chunk], logits[s : s + chunk])
    return idx, logits


def test_round_trip_fp32_is_exact_and_survives_reopen_and_compaction(tmp_path):
    cache = TeacherCache(tmp_path, SPEC)
    idx, logits = _fill(cache)
    order = np.argsort(idx)[::-1].copy()
    assert torch.equal(cache.get(idx[order]), logits[order])
    reopened = TeacherCache(tmp_path, SPEC)
    assert reopened.n_blocks == 4
    assert reopened.compact()
    assert reopened.n_blocks == 1 and len(list((tmp_path / "segments").glob("*.seg"))) == 1
    assert torch.equal(TeacherCache(tmp_path, SPEC).get(idx), logits)
    assert np.array_equal(reopened.indices, np.sort(idx))


def test_fp16_round_trip_within_half_precision(tmp_path):
    cache = TeacherCache(tmp_path, CacheSpec("t", "d", "v", 10, "float16"))
    idx, logits = _fill(cache)
    err = (cache.get(idx) - logits).abs() / logits.abs().clamp_min(1)
    assert err.max() < 1e-3  # fp16 keeps 11 significant bits: relative error <= 2^-11


def test_topk_keeps_topk_probabilities_and_rest_mass():
    logits = torch.randn(64, 100) * 3
    values, ids = encode_topk(logits, 5)
    decoded = decode_topk(values, ids, 100)
    p, q = logits.softmax(1), decoded.softmax(1)
    top = logits.topk(5, 1).indices
    assert torch.equal(decoded.topk(5, 1).indices.sort(1).values, top.sort(1).values)
    assert (p.gather(1, top) - q.gather(1, top)).abs().max() < 2e-3  # fp16 logits
    rest_p = 1 - p.gather(1, top).sum(1)
    rest_q = 1 - q.gather(1, top).sum(1)
    assert (rest_p - rest_q).abs().max() < 2e-3


def test_topk_cache_round_trip(tmp_path):
    cache = TeacherCache(tmp_path, CacheSpec("t", "d", "v", 10, "topk", 3))
    idx, logits = _fill(cache)
    got = cache.get(idx)
    assert torch.allclose(got.topk(3, 1).values, logits.topk(3, 1).values, atol=1e-2, rtol=1e-3)


def test_other_teacher_dataset_or_view_is_refused_naming_the_field(tmp_path):
    TeacherCache(tmp_path, SPEC)
    for field, value in [("teacher", "sha256:other"), ("dataset", "d2"), ("view", "augmented"), ("dtype", "float16")]:
        spec = CacheSpec(**{**SPEC.__dict__, field: value})
        with pytest.raises(CacheMismatchError, match=f"{field}: cache has"):
            TeacherCache(tmp_path, spec)


def test_reset_moves_the_old_cache_aside_without_losing_it(tmp_path):
    d = tmp_path / "c"
    idx, logits = _fill(TeacherCache(d, SPEC))
    new = TeacherCache(d, CacheSpec(**{**SPEC.__dict__, "teacher": "sha256:other"}), reset=True)
    assert len(new) == 0
    (aside,) = tmp_path.glob("c.stale-*")
    assert torch.equal(TeacherCache(aside, SPEC).get(idx), logits)


def test_flipped_byte_is_detected_and_named(tmp_path):
    cache = TeacherCache(tmp_path, SPEC)
    _fill(cache)
    (victim,) = (tmp_path / "segments").glob("*.seg")
    data = bytearray(victim.read_bytes())
    data[-200] ^= 0x01  # inside the last block's values
    victim.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptedError, match=victim.name + ".*fail their checksum.*lkd cache repair"):
        TeacherCache(tmp_path, SPEC)


def test_truncated_file_is_detected_and_named(tmp_path):
    cache = TeacherCache(tmp_path, SPEC)
    _fill(cache)
    (victim,) = (tmp_path / "segments").glob("*.seg")
    victim.write_bytes(victim.read_bytes()[:-16])
    with pytest.raises(CacheCorruptedError, match="6 committed outputs are missing"):
        TeacherCache(tmp_path, SPEC, verify=False)  # the ledger knows what was committed: no checksum pass needed


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.full((4, 10), float("nan")), "NaN/inf"),
        (torch.full((4, 10), float("inf")), "NaN/inf"),
        (torch.zeros(4, 9), r"shape \(4, 9\)"),
        (torch.zeros(3, 10), r"shape \(3, 10\)"),
    ],
)
def test_invalid_outputs_are_refused_before_anything_is_stored(tmp_path, bad, match):
    cache = TeacherCache(tmp_path, SPEC)
    with pytest.raises(ValueError, match=match):
        cache.write(np.arange(4), bad)
    assert len(cache) == 0 and not list((tmp_path / "segments").iterdir())
    assert TeacherCache(tmp_path, SPEC).ledger.used == 0  # nothing was recorded either


def test_outputs_are_never_overwritten(tmp_path):
    cache = TeacherCache(tmp_path, SPEC)
    cache.write(np.arange(4), torch.zeros(4, 10))
    with pytest.raises(ValueError, match="already have cached outputs"):
        cache.write(np.arange(2, 6), torch.ones(4, 10))
    assert torch.equal(cache.get(np.arange(4)), torch.zeros(4, 10))


def test_missing_index_raises_key_error_naming_it(tmp_path):
    cache = TeacherCache(tmp_path, SPEC)
    cache.write(np.arange(4), torch.zeros(4, 10))
    with pytest.raises(KeyError, match=r"\[7\]"):
        cache.get([1, 7])


def test_outputs_durable_before_their_commit_record_are_kept(tmp_path, monkeypatch):
    from lightning_kd.cache.ledger import Ledger

    cache = TeacherCache(tmp_path, SPEC)
    cache.write(np.arange(4), torch.ones(4, 10))
    real = Ledger.append

    def crash_on_commit(self, op, **fields):
        if op == "commit":
            raise KeyboardInterrupt("killed after the outputs were fsynced, before the commit line")
        return real(self, op, **fields)

    monkeypatch.setattr(Ledger, "append", crash_on_commit)
    with pytest.raises(KeyboardInterrupt):
        cache.write(np.arange(4, 8), torch.zeros(4, 10))
    monkeypatch.setattr(Ledger, "append", real)
    reopened = TeacherCache(tmp_path, SPEC)
    assert np.array_equal(reopened.indices, np.arange(8))  # paid and durable: never dropped
    assert torch.equal(reopened.get(np.arange(4, 8)), torch.zeros(4, 10))
    assert reopened.ledger.used == 8


@pytest.mark.parametrize("bad, match", [([[0.0] * 10] * 4, "returned a list"),
                                        (torch.zeros(4, 10, dtype=torch.int64), "torch.int64 outputs")])
def test_outputs_that_are_not_floating_logits_are_refused_naming_why(tmp_path, bad, match):
    from lightning_kd.cache import as_logits

    with pytest.raises(TypeError, match=match):
        as_logits(bad)
    assert as_logits(np.ones((4, 10))).dtype == torch.float32  # a numpy array is converted


def test_a_cache_pickles_for_spawned_dataloader_workers(tmp_path):
    import pickle

    cache = TeacherCache(tmp_path, SPEC)
    idx, logits = _fill(cache)
    again = pickle.loads(pickle.dumps(cache))  # what a spawn / forkserver worker receives
    assert torch.equal(again.get(idx), logits)
