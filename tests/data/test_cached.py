import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_kd.cache import TeacherBudget, TeacherBudgetExceeded, TeacherCache
from lightning_kd.data import fill_cache, select_samples

sys.path.insert(0, str(Path(__file__).parents[1]))
from teachers_for_tests import (  # noqa: E402
    CountingTeacher,
    logged_samples,
    make_datamodule,
    run_helper,
    teacher_function,
)

HELPER = Path(__file__).parents[1] / "teachers_for_tests.py"


def stored(cache_dir: Path) -> int:
    """Samples whose outputs the ledger records as committed (0 before the cache exists)."""
    if not (cache_dir / "ledger.jsonl").exists():
        return 0
    return TeacherBudget(0, cache_dir).summary().committed
BUDGET = 300


def expected_outputs(dm, indices):
    """What the teacher returns on the fixed augmented view of ``indices`` (recomputed, no budget)."""
    ds = dm.datamodule.make_dataset(indices, "fixed", normalize=False, seed=dm.h.seed)
    return teacher_function(ds.__getitems__(list(range(len(indices))))["input"])


def test_fill_costs_exactly_the_budget_and_a_second_run_nothing(tmp_path):
    teacher = CountingTeacher()
    dm = make_datamodule(teacher, tmp_path, BUDGET, fill_batch_size=64)
    dm.fill()
    assert teacher.calls == BUDGET and dm.new_teacher_calls == BUDGET and dm.budget_state.used == BUDGET
    assert len(dm.train_indices) == BUDGET
    assert torch.equal(dm.cache.get(dm.train_indices), expected_outputs(dm, dm.train_indices))

    again_teacher = CountingTeacher()
    again = make_datamodule(again_teacher, tmp_path, BUDGET, fill_batch_size=64)
    again.fill()
    assert again_teacher.calls == 0 and again.new_teacher_calls == 0
    assert np.array_equal(again.train_indices, dm.train_indices)

    batch = next(iter(again.train_dataloader()))
    assert set(batch) == {"index", "input", "target", "teacher_logits"}
    assert torch.equal(batch["teacher_logits"], again.cache.get(batch["index"]))
    assert torch.equal(batch["target"], torch.from_numpy(again.targets(batch["index"].numpy())))
    for loader in (again.val_dataloader(), again.test_dataloader()):
        assert "teacher_logits" not in next(iter(loader))
    assert again_teacher.calls == 0


def test_training_inputs_are_freshly_augmented_while_teacher_outputs_stay_fixed(tmp_path):
    dm = make_datamodule(CountingTeacher(), tmp_path, 64, fill_batch_size=64)
    dm.fill()
    ds = dm.train_dataset()
    a, b = ds.__getitems__(list(range(64))), ds.__getitems__(list(range(64)))
    assert not torch.equal(a["input"], b["input"])
    assert torch.equal(a["teacher_logits"], b["teacher_logits"])


def test_one_sample_over_the_budget_raises_before_any_call(tmp_path):
    dm = make_datamodule(CountingTeacher(), tmp_path / "dm", BUDGET)
    dm.setup("fit")
    teacher = CountingTeacher()
    cache = dm._open_cache(teacher)
    dataset = dm.datamodule.make_dataset(dm.datamodule.train_indices[: BUDGET + 1], "eval", normalize=False)
    with pytest.raises(TeacherBudgetExceeded, match=f"{BUDGET + 1} samples need teacher outputs"):
        fill_cache(teacher, dataset, cache, TeacherBudget(BUDGET, cache.directory), progress=False)
    assert teacher.calls == 0 and len(cache) == 0


def test_per_call_guard_refuses_the_call_that_would_exceed(tmp_path):
    """Even if a caller skips the up-front check, reserve() stops the exceeding call before it happens."""
    budget = TeacherBudget(100, tmp_path)
    teacher = CountingTeacher()
    tokens = 0
    with pytest.raises(TeacherBudgetExceeded):
        for _ in range(3):
            budget.reserve(40)
            teacher(torch.zeros(40, 3, 32, 32))
            tokens += 1
    assert teacher.calls == 80 and tokens == 2


@pytest.mark.parametrize("fail_at", [1, 2, 5])  # first call, a chunk boundary inside, the last (partial) chunk
def test_teacher_crash_then_resume_keeps_committed_outputs_and_the_budget(tmp_path, fail_at):
    failing = CountingTeacher(fail_at=fail_at)
    dm = make_datamodule(failing, tmp_path, BUDGET, fill_batch_size=64)
    with pytest.raises(RuntimeError, match=f"call {fail_at}"):
        dm.fill()
    before = TeacherCache(tmp_path)
    assert len(before) == 64 * (fail_at - 1)
    committed = before.indices
    snapshot = before.get(committed).clone()

    resumed_teacher = CountingTeacher()
    resumed = make_datamodule(resumed_teacher, tmp_path, BUDGET, fill_batch_size=64)
    resumed.fill()
    assert failing.calls + resumed_teacher.calls == BUDGET  # the failed call produced nothing and was released
    assert resumed_teacher.calls == BUDGET - len(committed)
    assert torch.equal(resumed.cache.get(committed), snapshot)  # bit-identical
    assert len(resumed.cache) == BUDGET and np.array_equal(resumed.train_indices, resumed.selected)
    assert resumed.budget_state.used == BUDGET and resumed.budget_state.lost == 0


def test_outputs_lost_after_a_paid_call_are_counted_and_reported(tmp_path, monkeypatch):
    real_append = TeacherCache.append
    writes = {"n": 0}

    def dies_on_second_write(self, *args, **kwargs):
        writes["n"] += 1
        if writes["n"] == 2:
            raise KeyboardInterrupt("process killed after the teacher returned, before the outputs were stored")
        return real_append(self, *args, **kwargs)

    monkeypatch.setattr(TeacherCache, "append", dies_on_second_write)
    first = CountingTeacher()
    with pytest.raises(KeyboardInterrupt):
        make_datamodule(first, tmp_path, BUDGET, fill_batch_size=64).fill()
    monkeypatch.setattr(TeacherCache, "append", real_append)
    assert first.calls == 128  # the second batch was paid for

    with pytest.raises(TeacherBudgetExceeded, match="64 lost"):
        make_datamodule(CountingTeacher(), tmp_path, BUDGET, fill_batch_size=64, strict=True).fill()

    second = CountingTeacher()
    dm = make_datamodule(second, tmp_path, BUDGET, fill_batch_size=64)
    with pytest.warns(UserWarning, match=r"236 of the 300 selected samples have no teacher outputs but only 172 of "
                      r"the budget 300 remain \(128 used = 64 stored \+ 0 in flight \+ 64 lost"):
        dm.fill()
    assert first.calls + second.calls <= BUDGET
    assert second.calls == BUDGET - 128
    assert dm.budget_state.lost == 64 and dm.budget_state.used == BUDGET
    assert len(dm.train_indices) == BUDGET - 64


def test_kill_9_mid_fill_then_resume(tmp_path):
    log = tmp_path / "calls.log"
    cache_dir = tmp_path / "cache"
    child = subprocess.Popen(
        [sys.executable, str(HELPER), "fill", str(cache_dir), str(log), str(BUDGET), "20", "0.25"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline and stored(cache_dir) < 60:
        assert child.poll() is None, child.stderr.read().decode()
        time.sleep(0.05)
    time.sleep(0.1)  # land somewhere inside the next call or commit
    child.send_signal(signal.SIGKILL)
    child.wait()

    after_kill = TeacherCache(cache_dir)
    committed = after_kill.indices
    snapshot = after_kill.get(committed).clone()
    assert 0 < len(committed) < BUDGET
    child_calls = len(logged_samples(log))

    teacher = CountingTeacher()
    dm = make_datamodule(teacher, cache_dir, BUDGET, fill_batch_size=20)
    lost = TeacherBudget(BUDGET, cache_dir).lost
    if lost:
        with pytest.warns(UserWarning, match=f"{lost} lost"):
            dm.fill()
    else:
        dm.fill()
    assert child_calls + teacher.calls <= BUDGET
    assert torch.equal(dm.cache.get(committed), snapshot)
    assert torch.equal(dm.cache.get(dm.train_indices), expected_outputs(dm, dm.train_indices))
    assert len(dm.train_indices) == BUDGET - lost
    assert lost <= 20  # at most the call in flight


def test_selection_is_seeded_nested_and_class_balanced():
    pool = np.arange(5000)
    targets = np.repeat(np.arange(10), 500)
    a, b = select_samples(pool, targets, 1000, "random", 0), select_samples(pool, targets, 1000, "random", 0)
    assert np.array_equal(a, b) and len(np.unique(a)) == 1000
    assert not np.array_equal(a, select_samples(pool, targets, 1000, "random", 1))
    assert np.isin(select_samples(pool, targets, 500, "random", 0), a).all()  # nested
    bal = select_samples(pool, targets, 1000, "class_balanced", 0)
    assert np.array_equal(np.bincount(targets[bal]), np.full(10, 100))
    assert np.isin(select_samples(pool, targets, 200, "class_balanced", 0), bal).all()
    with pytest.raises(ValueError, match="exceeds the 5000"):
        select_samples(pool, targets, 5001)


def test_validation_split_follows_the_80_20_protocol(tmp_path):
    dm = make_datamodule(CountingTeacher(), tmp_path, 400)
    dm.setup("fit")
    assert len(dm.val_indices) == 100  # 400 * 0.2 / 0.8
    assert not np.isin(dm.val_indices, dm.selected).any()
    assert np.isin(dm.val_indices, dm.datamodule.train_indices).all()


def test_ckd_tuples_batches_are_groups_of_cached_samples(tmp_path):
    dm = make_datamodule(CountingTeacher(), tmp_path, 128, group_size=3, max_tuples=1000)
    dm.fill()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (32, 3, 3, 32, 32) and batch["teacher_logits"].shape == (32, 3, 10)
    assert batch["index"].shape == (32, 3)
    assert (batch["index"][:, 0] != batch["index"][:, 1]).all()
    assert torch.equal(batch["teacher_logits"].flatten(0, 1), dm.cache.get(batch["index"].flatten()))
    assert dm.sides == (2, 1)
    assert len(dm.train_dataloader()) == 4  # an epoch: 128 // 32 batches of tuples


@pytest.mark.parametrize("group_size", [2, 3, 4])
def test_an_epoch_of_tuples_has_the_steps_of_an_epoch_of_samples(tmp_path, group_size):
    # 100 samples, batch 32: single samples give 3 full batches (the partial one is dropped); tuples must too, so
    # that KD and CKD train the same number of optimizer steps at a budget.
    plain = make_datamodule(CountingTeacher(), tmp_path, 100)
    plain.fill()
    tuples = make_datamodule(CountingTeacher(), tmp_path, 100, group_size=group_size)
    tuples.fill()
    assert len(plain.train_dataloader()) == len(tuples.train_dataloader()) == 3
    assert [len(b["index"]) for b in tuples.train_dataloader()] == [32, 32, 32]


@pytest.mark.ddp
def test_ddp_two_processes_fill_disjoint_shards_and_see_the_same_cache(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_helper("ddp", out, tmp_path / "cache", BUDGET, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["calls"] + r1["calls"] == BUDGET and r0["calls"] > 0 and r1["calls"] > 0
    assert r0["cached"] == r1["cached"] == BUDGET
    assert r0["indices_sha"] == r1["indices_sha"] and r0["values_sha"] == r1["values_sha"]
    assert r0["budget_used"] == r1["budget_used"] == BUDGET
    assert r0["new_calls"] == r1["new_calls"] == BUDGET


def test_resume_from_a_checkpoint_keeps_the_budget_even_if_the_ledger_is_gone(tmp_path):
    import shutil

    import lightning as L

    from lightning_kd.modules import KnowledgeDistillation

    def trainer():
        return L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)

    t = trainer()
    t.fit(KnowledgeDistillation(student="resnet8"), make_datamodule(CountingTeacher(), tmp_path / "cache", 64))
    ckpt = tmp_path / "resume.ckpt"
    t.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=True)["CachedTeacherDataModule"]["budget"]["used"] == 64
    shutil.rmtree(tmp_path / "cache")  # outputs and ledger lost; the checkpoint remembers 64 paid calls
    teacher = CountingTeacher()
    match = "budget 64 is spent .*64 recorded only in a checkpoint.*no sample to train on"
    with pytest.raises(TeacherBudgetExceeded, match=match):
        dm = make_datamodule(teacher, tmp_path / "cache", 64)
        trainer().fit(KnowledgeDistillation(student="resnet8"), dm, ckpt_path=ckpt)
    assert teacher.calls == 0


def test_every_returned_batch_is_stored_before_the_next_call(tmp_path):
    failing = CountingTeacher(fail_at=4)
    dm = make_datamodule(failing, tmp_path, BUDGET, fill_batch_size=64)
    with pytest.raises(RuntimeError, match="call 4"):
        dm.fill()
    cache = TeacherCache(tmp_path)
    assert len(cache) == 3 * 64 and cache.n_blocks == 3  # one durable block per returned batch
    assert TeacherBudget(BUDGET, tmp_path).used == 3 * 64  # the failed call was known unprocessed: released


@pytest.mark.ddp
def test_ddp_a_failing_rank_stops_every_rank_and_keeps_committed_outputs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_helper("ddp", out, tmp_path / "cache", BUDGET, 1, cwd=tmp_path)
    assert proc.returncode != 0 and "teacher API failed on call 1" in proc.stderr  # no hang at the barrier
    cache = TeacherCache(tmp_path / "cache")
    assert len(cache) > 0  # rank 0's outputs, returned while rank 1 failed, are kept
    assert TeacherBudget(BUDGET, tmp_path / "cache").used == len(cache)


def test_a_resume_whose_paid_outputs_were_all_lost_buys_what_the_budget_still_allows(tmp_path):
    """A writer that died holding claims on 100 samples: paid and lost. The resume buys the 200 the budget still
    allows and trains on them, with a warning, instead of refusing."""
    dm = make_datamodule(CountingTeacher(), tmp_path, BUDGET)
    dm.setup("fit")
    dm._open_cache(CountingTeacher())
    dead = TeacherBudget(BUDGET, tmp_path)
    dead.claim(dm.selected, 100)
    dead._lease.release()  # killed after the call, before its outputs were stored
    dead._lease = None
    teacher = CountingTeacher()
    resumed = make_datamodule(teacher, tmp_path, BUDGET, fill_batch_size=50)
    with pytest.warns(UserWarning, match=r"100 of the 300 selected samples have no teacher outputs and the budget"):
        resumed.fill()
    assert teacher.calls == 200 and len(resumed.train_indices) == 200
    s = resumed.budget_state.summary()
    assert (s.used, s.committed, s.lost) == (BUDGET, 200, 100)


def test_a_smaller_budget_trains_on_its_nested_share_for_free_and_says_so(tmp_path):
    make_datamodule(CountingTeacher(), tmp_path, BUDGET, fill_batch_size=100).fill()
    teacher = CountingTeacher()
    smaller = make_datamodule(teacher, tmp_path, 100, fill_batch_size=100)
    with pytest.warns(UserWarning, match=r"leaves 200 paid teacher outputs .* unused \(changed since they were "
                                         r"bought: budget 300 -> 100\); it needs no new teacher call"):
        smaller.fill()
    assert teacher.calls == 0 and len(smaller.train_indices) == 100


@pytest.mark.parametrize("change", [{"selection": "class_balanced"}, {"seed": 5, "view": "clean"}])
def test_a_changed_selection_that_would_leave_paid_outputs_unused_is_refused_naming_the_setting(tmp_path, change):
    base = {"view": change.get("view", "augmented")}
    first = CountingTeacher()
    make_datamodule(first, tmp_path, BUDGET, fill_batch_size=100, **base).fill()
    snapshot = TeacherCache(tmp_path).get(TeacherCache(tmp_path).indices).clone()
    teacher = CountingTeacher()
    setting = next(k for k in change if k != "view")
    with pytest.raises(TeacherBudgetExceeded, match=rf"unused \(changed since they were bought: {setting} .*"
                                                    r"selection='cached'"):
        make_datamodule(teacher, tmp_path, BUDGET, **{**base, **change}).fill()
    assert teacher.calls == 0
    cached = make_datamodule(teacher, tmp_path, BUDGET, **{**base, **change, "selection": "cached"})
    cached.fill()  # the documented way out: train on what was paid for
    assert teacher.calls == 0 and len(cached.train_indices) == BUDGET
    assert torch.equal(cached.cache.get(cached.cache.indices), snapshot)


@pytest.mark.parametrize("kw, match", [
    ({"budget": 0}, "budget must be an integer >= 1, got 0"),
    ({"budget": 300.5}, "budget must be an integer >= 1, got 300.5"),
    ({"budget": "300"}, "budget must be an integer >= 1, got '300'"),
    ({"budget": -5}, "budget must be an integer >= 1, got -5"),
    ({"fill_batch_size": 0}, "fill_batch_size must be an integer >= 1"),
    ({"selection": "best"}, "unknown selection strategy 'best'; known: badge, .*; or 'cached'"),
])
def test_bad_arguments_are_refused_at_construction_naming_them(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        make_datamodule(CountingTeacher(), tmp_path / "cache", **{"budget": BUDGET, **kw})
    assert not (tmp_path / "cache").exists()


def test_a_budget_larger_than_the_pool_is_refused_before_the_cache_is_made(tmp_path):
    dm = make_datamodule(CountingTeacher(), tmp_path / "cache", 50_001)
    with pytest.raises(ValueError, match="budget 50001 exceeds the 45000 training samples"):
        dm.setup("fit")
    assert not (tmp_path / "cache").exists()


class ClassIdTeacher(CountingTeacher):
    def __call__(self, x):
        return super().__call__(x).argmax(1)  # class ids, not logits


def test_a_teacher_returning_class_ids_is_refused_naming_the_dtype_and_the_call_stays_paid(tmp_path):
    teacher = ClassIdTeacher()
    with pytest.raises(TypeError, match="torch.int64 outputs; logits must be floating point"):
        make_datamodule(teacher, tmp_path, BUDGET, fill_batch_size=100).fill()
    s = TeacherBudget(BUDGET, tmp_path).summary()
    assert teacher.calls == 100 and (s.used, s.lost, s.committed) == (100, 100, 0)
