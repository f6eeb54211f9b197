import json

import numpy as np
import pytest

from lightning_kd.cache import CacheCorruptedError, TeacherBudget, TeacherBudgetExceeded


def die(budget: TeacherBudget) -> None:
    """What a hard kill does to a writer: the kernel drops its lease; its journal lines stay."""
    budget._lease.release()
    budget._lease = None


def test_reserve_commit_release_accounting(tmp_path):
    b = TeacherBudget(10, tmp_path)
    t1 = b.reserve(4)
    b.commit(t1)
    t2 = b.reserve(3)
    b.release(t2)  # the call failed before the teacher processed anything: the samples come back
    assert (b.used, b.remaining) == (4, 6)
    with pytest.raises(TeacherBudgetExceeded, match="7 more sample"):
        b.reserve(7)
    assert b.used == 4  # a refused reservation changes nothing


def test_a_dead_writers_reservation_stays_counted_as_lost_a_live_ones_as_in_flight(tmp_path):
    b = TeacherBudget(10, tmp_path)
    b.commit(b.reserve(3))
    b.reserve(2)
    other = TeacherBudget(10, tmp_path)
    s = other.summary()
    assert (s.used, s.in_flight, s.lost, s.writers_in_flight) == (5, 2, 0, (b.writer,))
    die(b)
    s = TeacherBudget(10, tmp_path).summary()
    assert (s.used, s.committed, s.in_flight, s.lost) == (5, 3, 0, 2)


def test_two_budgets_on_one_directory_spend_it_once(tmp_path):
    a, b = TeacherBudget(10, tmp_path), TeacherBudget(10, tmp_path)  # both built before either reserves
    a.reserve(6)
    with pytest.raises(TeacherBudgetExceeded, match="6 of 10 used"):
        b.reserve(5)
    b.reserve(4)
    assert a.used == b.used == 10


def test_claims_are_disjoint_and_a_dead_writers_claims_are_taken_over(tmp_path):
    a, b = TeacherBudget(100, tmp_path), TeacherBudget(100, tmp_path)
    pool = np.arange(20)
    ta, ia = a.claim(pool, 8)
    tb, ib = b.claim(pool, 8)
    assert not np.intersect1d(ia, ib).size and len(ia) == len(ib) == 8
    a.commit(ta)
    die(b)  # b's claim is left pending by a dead writer
    tc, ic = TeacherBudget(100, tmp_path).claim(pool, 100)
    assert np.array_equal(np.sort(ic), np.setdiff1d(pool, ia))  # b's 8 taken over, plus the 4 never claimed
    s = a.summary()
    assert (s.used, s.lost) == (8 + 8 + 12, 8)


def test_torn_last_line_reserved_nothing_and_later_lines_may_follow_it(tmp_path):
    b = TeacherBudget(10, tmp_path)
    b.commit(b.reserve(3))
    with open(tmp_path / "ledger.jsonl", "ab") as f:
        f.write(json.dumps({"seq": 3, "op": "reserve", "id": "x", "n": 5}).encode()[:12])  # crash mid-append
    c = TeacherBudget(10, tmp_path)
    assert c.used == 3
    c.commit(c.reserve(2))
    assert TeacherBudget(10, tmp_path).used == 5  # the torn fragment is acknowledged, not read as damage


@pytest.mark.parametrize("damage", ["flip", "delete_line", "shrink", "garbage"])
def test_a_damaged_ledger_never_reads_as_less_spent(tmp_path, damage):
    b = TeacherBudget(300, tmp_path)
    for _ in range(3):
        b.commit(b.reserve(50))
    path = tmp_path / "ledger.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    if damage == "flip":
        lines[3] = lines[3].replace(b'"n":50', b'"n":10')
    elif damage == "delete_line":
        del lines[3]
    elif damage == "garbage":
        lines = [b"\xff\xfe garbage \x00\n"] + lines[1:]
    path.write_bytes(b"".join(lines) if damage != "shrink" else b"")
    with pytest.raises(CacheCorruptedError, match="ledger.*(damaged|missing|sequence|first line)"):
        TeacherBudget(300, tmp_path).used
    if damage in ("delete_line", "shrink"):  # a process that read it before sees it shrink
        with pytest.raises(CacheCorruptedError, match="shrank.*lkd cache repair"):
            b.reserve(1)


def test_checkpoint_state_is_a_floor(tmp_path):
    b = TeacherBudget(10, tmp_path)
    b.load_state_dict({"total": 10, "used": 7, "lost": 0})  # e.g. the ledger was lost but a checkpoint remains
    assert b.used == 7 and b.remaining == 3
    with pytest.raises(TeacherBudgetExceeded):
        b.reserve(4)
    assert b.state_dict()["used"] == 7


@pytest.mark.parametrize("bad", [0.5, "300", True, -5, None])
def test_budget_must_be_a_non_negative_integer(bad):
    with pytest.raises(ValueError, match="budget must be an integer"):
        TeacherBudget(bad)
