import json

import pytest

from lightning_kd.budget import TeacherBudget, TeacherBudgetExceeded, read_ledger


def test_reserve_commit_release_accounting(tmp_path):
    b = TeacherBudget(10, tmp_path)
    t1 = b.reserve(4)
    b.commit(t1)
    t2 = b.reserve(3)
    b.release(t2)  # the call raised: nothing was produced, the samples come back
    assert (b.used, b.remaining) == (4, 6)
    with pytest.raises(TeacherBudgetExceeded, match="7 more sample"):
        b.reserve(7)
    assert b.used == 4  # a refused reservation changes nothing


def test_budget_persists_and_counts_lost_reservations(tmp_path):
    b = TeacherBudget(10, tmp_path)
    b.commit(b.reserve(3))
    b.reserve(2)  # the process "dies" after the call, before the commit
    again = TeacherBudget(10, tmp_path)
    assert again.used == 5 and again.lost == 2 and again.remaining == 5
    assert read_ledger(tmp_path / "ledger").committed == 3


def test_torn_journal_line_reserved_nothing(tmp_path):
    b = TeacherBudget(10, tmp_path)
    b.commit(b.reserve(3))
    journal = next((tmp_path / "ledger").glob("*.jsonl"))
    with open(journal, "a") as f:
        f.write(json.dumps({"op": "reserve", "id": "x", "n": 5})[:12])  # crash mid-append
    assert TeacherBudget(10, tmp_path).used == 3


def test_quota_limits_one_writer(tmp_path):
    b = TeacherBudget(100, tmp_path, quota=5)
    b.reserve(5)
    with pytest.raises(TeacherBudgetExceeded, match="quota"):
        b.reserve(1)


def test_checkpoint_state_is_a_floor(tmp_path):
    b = TeacherBudget(10, tmp_path)
    b.load_state_dict({"total": 10, "used": 7, "lost": 0})  # e.g. the ledger was lost but a checkpoint remains
    assert b.used == 7 and b.remaining == 3
    with pytest.raises(TeacherBudgetExceeded):
        b.reserve(4)
    assert b.state_dict()["used"] == 7
