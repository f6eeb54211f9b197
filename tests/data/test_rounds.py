"""Buying the budget in rounds: exact spending, replay for free, kills, DDP and concurrent runs, the schedule."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lightning_kd.data.rounds import RoundSchedule
from lightning_kd.selection import list_strategies

sys.path.insert(0, str(Path(__file__).parents[1]))
from rounds_for_tests import BUDGET, EPOCHS, ROUNDS, Blobs, DyingTeacher, datamodule, fit  # noqa: E402
from teachers_for_tests import CountingTeacher, logged_samples  # noqa: E402


def script(*args, cwd, timeout=300):
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    return subprocess.run([sys.executable, str(Path(__file__).parents[1] / "rounds_for_tests.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


# -- the schedule ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "budget, rounds, fraction, sizes",
    [(90, 3, None, [30, 30, 30]), (100, 3, None, [34, 33, 33]), (1000, 4, 0.1, [100, 300, 300, 300]),
     (7, 1, None, [7]), (10, 3, 0.5, [5, 3, 2])],
)
def test_round_sizes_sum_to_the_budget(budget, rounds, fraction, sizes):
    assert RoundSchedule(budget, rounds, fraction).sizes == sizes


def test_rounds_start_at_equal_shares_of_the_epochs():
    s = RoundSchedule(90, 3)
    assert [s.start_epoch(r, 10) for r in range(3)] == [0, 3, 6]
    assert [s.round_at(e, 10) for e in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]


def test_buy_within_puts_every_round_in_the_first_share_of_the_epochs():
    s = RoundSchedule(90, 3, buy_within=0.25)
    assert [s.start_epoch(r, 300) for r in range(3)] == [0, 25, 50]
    assert s.round_at(24, 300) == 0 and s.round_at(50, 300) == 2 and s.round_at(299, 300) == 2
    assert s.min_epochs() == 12 and [s.start_epoch(r, 12) for r in range(3)] == [0, 1, 2]
    assert len({s.start_epoch(r, 11) for r in range(3)}) < 3  # below min_epochs two rounds would share an epoch
    assert RoundSchedule(90, 3).min_epochs() == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(rounds=0), "rounds must be an integer >= 1"), (dict(rounds=91), "larger than the budget 90"),
     (dict(initial_fraction=1.0), r"initial_fraction must be in \(0, 1\)"),
     (dict(rounds=3, initial_fraction=0.99), "leaves a round"),
     (dict(buy_within=0.0), r"buy_within must be a fraction of the epochs in \(0, 1\]"),
     (dict(buy_within=1.5), "buy_within must be")],
)
def test_bad_schedules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RoundSchedule(90, **{"rounds": 3, **kwargs})


def test_unknown_strategy_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown selection strategy 'entropyy'; known: badge, class_balanced"):
        datamodule(CountingTeacher(), tmp_path, "entropyy")


def test_student_driven_strategy_needs_a_first_round(tmp_path):
    with pytest.raises(ValueError, match="set rounds >= 2"):
        datamodule(CountingTeacher(), tmp_path, "margin", rounds=1)


@pytest.mark.parametrize("trainer_kw, dm_kw, message",
                         [(dict(reload_dataloaders_every_n_epochs=2), {}, "reloaded every epoch"),
                          (dict(max_epochs=2), {}, "max_epochs >= 3"),
                          (dict(max_epochs=5), dict(buy_within=0.5),
                           r"within the first 0.5 of them: give the Trainer max_epochs >= 6")])
def test_trainer_settings_rounds_cannot_work_with_are_refused_at_fit_start(tmp_path, trainer_kw, dm_kw, message):
    teacher = CountingTeacher()
    dm = datamodule(teacher, tmp_path / "cache", "margin", **dm_kw)
    with pytest.raises(ValueError, match=message):
        fit(dm, tmp_path, epochs=trainer_kw.pop("max_epochs", EPOCHS), **trainer_kw)
    assert teacher.calls == 0


# -- spending -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", sorted(list_strategies()))
def test_three_rounds_spend_exactly_the_budget_and_a_rerun_spends_nothing(tmp_path, strategy):
    log = tmp_path / "paid.log"
    dm = datamodule(CountingTeacher(log=str(log)), tmp_path / "cache", strategy)
    trainer = fit(dm, tmp_path / "a")
    assert dm.round == ROUNDS - 1 and [r["chosen"] for r in dm.round_log] == [30, 30]
    assert [r["new_calls"] for r in dm.round_log] == [30, 30] and not any(r["replayed"] for r in dm.round_log)
    assert len(logged_samples(log)) == BUDGET == dm.new_teacher_calls == len(set(logged_samples(log)))
    assert len(dm.selected) == len(dm.train_indices) == BUDGET
    assert not np.isin(dm.val_indices, dm.selected).any()
    # the same number of optimizer steps as buying everything at once: budget // batch per epoch
    assert trainer.global_step == EPOCHS * (BUDGET // 15)

    again = datamodule(CountingTeacher(log=str(log)), tmp_path / "cache", strategy)
    fit(again, tmp_path / "b")
    assert again.new_teacher_calls == 0 and len(logged_samples(log)) == BUDGET
    assert all(r["replayed"] and r["score_s"] == 0 for r in again.round_log)
    assert np.array_equal(again.selected, dm.selected)


def test_student_driven_rounds_choose_differently_from_random(tmp_path):
    picks = {}
    for strategy in ("random", "margin"):
        dm = datamodule(CountingTeacher(), tmp_path / strategy, strategy)
        fit(dm, tmp_path / f"run-{strategy}")
        picks[strategy] = set(dm.selected.tolist())
    assert picks["random"] != picks["margin"]
    first = datamodule(CountingTeacher(), tmp_path / "x", "random")
    first.setup("fit")  # round 0 is the same class-balanced share for every strategy
    assert set(first.selected.tolist()) <= picks["random"] & picks["margin"]


def test_rounds_bought_early_are_bought_at_their_epochs_and_filed_under_their_own_plan(tmp_path):
    dm = datamodule(CountingTeacher(), tmp_path / "cache", "margin", buy_within=0.5)
    trainer = fit(dm, tmp_path / "a", epochs=6)
    assert [r["epoch"] for r in dm.round_log] == [1, 2] and dm.new_teacher_calls == BUDGET
    assert trainer.global_step == 6 * (BUDGET // 15)
    # a run spreading its rounds over all epochs has another student at each round: it does not replay these
    spread = datamodule(CountingTeacher(), tmp_path / "cache", "margin")
    fit(spread, tmp_path / "b")
    assert not any(r["replayed"] for r in spread.round_log)
    assert dm._plan_record()["buy_within"] == 0.5 and "buy_within" not in spread._plan_record()


def test_one_round_is_todays_selection(tmp_path):
    from lightning_kd.data import select_samples

    dm = datamodule(CountingTeacher(), tmp_path / "cache", "random", rounds=1)
    dm.setup("fit")
    pool = dm.datamodule.train_indices
    want = np.sort(pool[np.random.default_rng(0).permutation(len(pool))[:BUDGET]])
    assert np.array_equal(dm.selected, want)
    assert np.array_equal(dm.selected, select_samples(pool, dm.targets(pool), BUDGET, "random", 0))


def test_retrain_trains_from_the_first_epoch_on_exactly_what_its_plan_bought_for_no_call(tmp_path):
    log, cache = tmp_path / "paid.log", tmp_path / "cache"
    with pytest.raises(ValueError, match=r"round\(s\) \[2, 3\] of 3 are not recorded .* run that fit first"):
        datamodule(CountingTeacher(log=str(log)), cache, "margin", retrain=True).setup("fit")
    with pytest.raises(ValueError, match="retrain=True trains on what an earlier fit bought in rounds"):
        datamodule(CountingTeacher(), cache, "random", rounds=1, retrain=True)
    chooser = datamodule(CountingTeacher(log=str(log)), cache, "margin")
    fit(chooser, tmp_path / "a")
    # the same samples and validation split as selection="cached" on a cache holding this purchase alone
    cached = datamodule(CountingTeacher(), cache, "cached", rounds=1)
    cached.setup("fit")
    # another plan on the same cache buys more: the retrain still takes margin's purchase, and only it
    with pytest.warns(UserWarning, match="no teacher outputs"):  # both plans share the cache's ledger, 180 in all
        fit(datamodule(CountingTeacher(log=str(log)), cache, "random", budget=2 * BUDGET), tmp_path / "b")
    paid = len(logged_samples(log))
    assert paid > BUDGET

    keep = datamodule(CountingTeacher(log=str(log)), cache, "margin", retrain=True)
    trainer = fit(keep, tmp_path / "c", epochs=2)  # fewer epochs than the rounds need: a retrain buys none
    assert np.array_equal(keep.selected, chooser.selected) and np.array_equal(keep.train_indices, chooser.selected)
    assert np.array_equal(keep.selected, cached.selected) and np.array_equal(keep.val_indices, cached.val_indices)
    assert keep.new_teacher_calls == 0 and len(logged_samples(log)) == paid and keep.round_log == []
    assert trainer.global_step == 2 * (BUDGET // 15)
    assert keep.budget_state.ledger.plans[-1]["retrain"] is True


# -- kills, resumes, concurrent runs, DDP ---------------------------------------------------------------------------
@pytest.mark.parametrize("die_at", ["epoch1", "5"], ids=["between-rounds", "inside-round-2-fill"])
def test_a_kill_then_a_resume_spends_at_most_the_budget_and_serves_every_selected_sample(tmp_path, die_at):
    log, out = tmp_path / "paid.log", tmp_path / "run" / "out.json"
    out.parent.mkdir()
    # round 1 is bought at epoch 1 (calls 4-6 of 10 samples): "5" dies inside round 1's fill, after being paid
    killed = script("run", out, tmp_path / "cache", log, "kcenter", die_at, cwd=tmp_path)
    assert killed.returncode in (17, 18), killed.stderr[-3000:]
    paid_before = len(logged_samples(log))
    assert 0 < paid_before < BUDGET
    resume = "resume" if die_at.startswith("epoch") else ""
    done = script("run", out, tmp_path / "cache", log, "kcenter", "", 0, resume, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    paid = logged_samples(log)
    assert result["round"] == ROUNDS - 1 and result["rounds"][0]["replayed"]  # round 1 was recorded before the kill
    if resume:  # killed between rounds: nothing was in flight, so everything bought is served
        assert len(paid) == len(set(paid)) == BUDGET == result["train"] == len(result["selected"])
    else:  # the call in flight at the kill was paid and lost: it counts, it is bought again, the budget holds
        assert len(paid) <= BUDGET and len(result["selected"]) == BUDGET
        assert result["train"] == len(set(paid)) >= BUDGET - 10


def test_two_runs_started_at_the_same_instant_share_each_round_and_the_budget(tmp_path):
    import subprocess

    log, start = tmp_path / "paid.log", time.time() + 8
    outs = [tmp_path / f"r{i}" / "out.json" for i in range(2)]
    procs = []
    for out in outs:
        out.parent.mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, str(Path(__file__).parents[1] / "rounds_for_tests.py"), "run", str(out),
             str(tmp_path / "cache"), str(log), "margin_kcenter", "", str(start)],
            env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[2])},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    a, b = (json.loads(o.read_text()) for o in outs)
    paid = logged_samples(log)
    assert len(paid) == BUDGET == len(set(paid)) == a["new_calls"] + b["new_calls"]
    assert a["selected"] == b["selected"] and a["train"] == b["train"] == BUDGET


@pytest.mark.ddp
def test_two_ddp_ranks_agree_on_every_round(tmp_path):
    log = tmp_path / "paid.log"
    proc = script("ddp", tmp_path, tmp_path / "cache", log, "badge", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["selected"] == r1["selected"] and len(r0["selected"]) == BUDGET
    assert [x["chosen"] for x in r0["rounds"]] == [x["chosen"] for x in r1["rounds"]] == [30, 30]
    paid = logged_samples(log)
    assert len(paid) == BUDGET == len(set(paid)) == r0["new_calls"] == r1["new_calls"]


def test_dying_teacher_dies_after_being_paid(tmp_path):
    """The kill test's premise: the k-th call is logged as paid before the process ends."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_call_twice, args=(str(tmp_path / "log"),))
    p.start()
    p.join(60)
    assert p.exitcode == 17 and len(logged_samples(tmp_path / "log")) == 4


def _call_twice(log):
    import torch

    t = DyingTeacher(die_at=2, log=log)
    for _ in range(3):
        t(torch.rand(2, 3, 16, 16))


def test_blobs_are_learnable_stand_in_data():
    ds = Blobs()
    assert len(ds) == 360 and ds[0][0].shape == (3, 16, 16) and 0 <= float(ds[5][0].min())
