"""The fault matrix: each fault is injected into a cache filled under a budget, then a resume and/or an open is
attempted. Every time: teacher calls over all runs stay within the budget, no committed row is lost or altered
(where the cache opens, or after ``repair``), and a refusal names the file and the ``lkd cache`` command."""

import errno
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_kd.cache import CacheCorruptedError, CacheMismatchError, TeacherBudget, TeacherCache
from lightning_kd.cache import format as fmt
from lightning_kd.cache.repair import repair
from lightning_kd.cache.verify import verify
from lightning_kd.cli import cache_tool

sys.path.insert(0, str(Path(__file__).parents[1]))
from teachers_for_tests import CountingTeacher, make_datamodule  # noqa: E402

BUDGET = 300


class OtherTeacher(CountingTeacher):
    fingerprint = "another-teacher-v1"


def _snapshot(directory: Path) -> dict[int, bytes]:
    cache = TeacherCache(directory)
    values = cache.get(cache.indices).numpy()
    return {int(i): values[j].tobytes() for j, i in enumerate(cache.indices)}


def _fill(directory: Path, budget: int) -> tuple[Path, int, dict[int, bytes]]:
    teacher = CountingTeacher()
    make_datamodule(teacher, directory, budget, fill_batch_size=50).fill()
    return directory, teacher.calls, _snapshot(directory)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return _fill(tmp_path_factory.mktemp("filled") / "cache", BUDGET)


@pytest.fixture(scope="module")
def large_template(tmp_path_factory):
    return _fill(tmp_path_factory.mktemp("filled_large") / "cache", 1500)  # two 1,024-row chunks when compacted


@pytest.fixture
def filled(template, tmp_path):
    src, calls, snap = template
    shutil.copytree(src, tmp_path / "cache")
    return tmp_path / "cache", calls, snap


def resume(directory: Path, budget: int = BUDGET, teacher=None) -> int:
    teacher = teacher or CountingTeacher()
    try:
        make_datamodule(teacher, directory, budget, fill_batch_size=50).fill()
    finally:
        resume.calls = teacher.calls
    return teacher.calls


def assert_kept(directory: Path, snap: dict[int, bytes], lost=()) -> None:
    """Every committed row not in ``lost`` is served with its original bytes."""
    cache = TeacherCache(directory)
    keep = np.asarray(sorted(set(snap) - set(lost)), dtype=np.int64)
    values = cache.get(keep).numpy()
    assert all(values[j].tobytes() == snap[int(i)] for j, i in enumerate(keep))


def _refused(directory: Path, err_type, *texts) -> None:
    for attempt in (lambda: resume(directory), lambda: TeacherCache(directory)):
        with pytest.raises(err_type) as info:
            attempt()
        for text in (*texts, f"lkd cache repair {directory}"):
            assert text in str(info.value)
    assert resume.calls == 0


def _flip_char_of_reserve_line(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = data.index(b'"op":"reserve"') + 30
    data[at] = ord("A") if data[at] != ord("A") else ord("B")
    path.write_bytes(bytes(data))


LEDGER_FAULTS = {
    "emptied": lambda p: p.write_bytes(b""),
    "deleted": lambda p: p.unlink(),
    "text garbage": lambda p: p.write_bytes(b"this is not a ledger\nnor is this\n"),
    "one character of a reserve line": _flip_char_of_reserve_line,
    "binary garbage": lambda p: p.write_bytes(os.urandom(3000)),
}


@pytest.mark.parametrize("fault", list(LEDGER_FAULTS))
def test_damaged_ledger_is_refused_then_repaired_without_refund(filled, fault):
    directory, calls, snap = filled
    LEDGER_FAULTS[fault](directory / "ledger.jsonl")
    _refused(directory, CacheCorruptedError, "ledger.jsonl" if fault != "deleted" else str(directory))
    assert not verify(directory).ok
    report = repair(directory)
    assert report.used_after >= BUDGET and report.kept == len(snap)
    assert TeacherBudget(BUDGET, directory).used >= BUDGET
    assert verify(directory).ok
    assert_kept(directory, snap)
    assert resume(directory) == 0 and calls + resume.calls <= BUDGET


def test_repair_keeps_lost_spending_the_readable_lines_prove(filled):
    """A lost reservation whose line is unreadable still counts, through the running totals around it."""
    directory, calls, snap = filled
    budget = TeacherBudget(BUDGET + 100, directory)
    budget.lose(budget.reserve(20), why="test: paid, no output")
    budget.lose(budget.reserve(5), why="test: paid, no output")  # its running total (325) proves the 20
    budget.close()
    lines = (directory / "ledger.jsonl").read_bytes().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if b'"n":20' in line)
    lines[at] = lines[at].replace(b'"n":20', b'"n":21')  # now fails its crc
    (directory / "ledger.jsonl").write_bytes(b"".join(lines))
    _refused(directory, CacheCorruptedError, "ledger.jsonl", f"line {at}")
    assert repair(directory).used_after == BUDGET + 25
    assert repair(directory, used_at_least=BUDGET + 50).used_after == BUDGET + 50
    assert TeacherBudget(BUDGET, directory).used == BUDGET + 50
    assert_kept(directory, snap)


def test_manifest_deleted_then_another_teacher_is_refused(filled):
    directory, calls, snap = filled
    (directory / "manifest.json").unlink()
    other = OtherTeacher()
    with pytest.raises(CacheCorruptedError, match="manifest.json is missing") as info:
        resume(directory, teacher=other)
    assert f"lkd cache repair {directory}" in str(info.value) and other.calls == 0
    assert not (directory / "manifest.json").exists()  # never recreated from the new request
    assert "ledger open record" in verify(directory).manifest_copies
    repair(directory)
    assert TeacherCache(directory).spec.teacher == CountingTeacher.fingerprint
    with pytest.raises(CacheMismatchError, match="cache has 'test-teacher-v1', requested 'another-teacher-v1'"):
        resume(directory, teacher=other)
    assert other.calls == 0
    assert_kept(directory, snap)
    assert resume(directory) == 0


@pytest.mark.parametrize("content", [b"\x00\xffnot json", b'[1, 2, 3]', b'{"format_version": 2, "teacher": 3}'])
def test_unreadable_manifest_is_refused_then_restored(filled, content):
    directory, calls, snap = filled
    (directory / "manifest.json").write_bytes(content)
    _refused(directory, CacheCorruptedError, "manifest.json")
    report = repair(directory)
    assert "restored manifest.json" in str(report)
    assert list(directory.glob("manifest.json.damaged-*"))[0].read_bytes() == content  # kept, not deleted
    assert_kept(directory, snap)
    assert resume(directory) == 0


def test_flipped_byte_in_compacted_segment_costs_its_chunk_only_and_is_bought_again_within_budget(
    large_template, tmp_path
):
    src, calls, snap = large_template
    directory = tmp_path / "cache"
    shutil.copytree(src, directory)
    (seg,) = (directory / "segments").glob("compact-*.seg")
    block = fmt.scan(seg).blocks[0]
    at = block.layout()["values"][0] + 1200 * block.width * 4 + 5  # row 1200: the second chunk
    data = bytearray(seg.read_bytes())
    data[at] ^= 0x01
    seg.write_bytes(bytes(data))
    _refused(directory, CacheCorruptedError, seg.name, "rows 1024..1500 fail their checksum")
    before = verify(directory)
    assert (before.intact, before.damaged, before.paid) == (1024, 476, 1500)
    report = repair(directory)
    lost = set(report.lost)
    assert len(lost) == 476 and report.kept == 1024
    assert (directory / "damaged" / seg.name).read_bytes() == bytes(data)  # moved aside, never deleted
    budget = TeacherBudget(1500, directory)
    assert (budget.used, budget.lost) == (1500, 476)
    assert_kept(directory, snap, lost)
    with pytest.warns(UserWarning, match="cannot buy them"):
        assert resume(directory, 1500) == 0  # paid and lost: no budget left to buy them again
    assert resume(directory, 1700) == 200  # new budget buys 200 of them, no more
    assert calls + 200 <= 1700 and TeacherBudget(1700, directory).used == 1700
    assert_kept(directory, snap, lost)


def test_deleted_segment_is_refused_then_recorded_as_paid_and_lost(filled):
    directory, calls, snap = filled
    (seg,) = (directory / "segments").glob("*.seg")
    seg.unlink()
    _refused(directory, CacheCorruptedError, "300 committed outputs are missing")
    report = repair(directory)
    assert len(report.lost) == BUDGET and report.used_after == BUDGET
    assert len(TeacherCache(directory)) == 0 and verify(directory).ok
    assert TeacherBudget(BUDGET, directory).lost == BUDGET
    with pytest.raises(Exception, match="budget"):
        resume(directory)
    assert resume.calls == 0


def test_tmp_leftover_is_removed_by_the_next_writer(filled):
    directory, calls, snap = filled
    leftover = directory / "segments" / ".compact-dead.seg.tmp"
    leftover.write_bytes(b"half a compaction")
    assert resume(directory) == 0
    assert not leftover.exists()
    assert_kept(directory, snap)


def test_read_only_cache_is_served_without_writing(filled, monkeypatch):
    """Tests run as root, which chmod does not stop: opening any cache file for writing fails with EROFS instead."""
    directory, calls, snap = filled
    files = {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    real_open = os.open

    def read_only(path, flags, *args, **kw):
        if str(path).startswith(str(directory)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", read_only)
    assert resume(directory) == 0
    assert verify(directory).ok
    with pytest.raises(PermissionError, match="read-only"):
        repair(directory)
    assert_kept(directory, snap)
    assert {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()} == files


def test_disk_full_during_append_names_file_and_bytes_and_keeps_what_was_committed(filled, monkeypatch):
    directory, calls, snap = filled

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fmt.os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"cannot write \d+ bytes to .*segments/.*\.seg: No space left") as info:
        resume(directory, BUDGET + 100)
    assert info.value.errno == errno.ENOSPC
    first = resume.calls
    assert first == 50  # one batch paid, its outputs not stored: recorded as lost
    assert all(p.stat().st_size in (0, (directory / "segments" / p.name).stat().st_size) for p in
               (directory / "segments").glob("vm-*.seg"))
    assert max(p.stat().st_size for p in (directory / "segments").glob("*.seg") if "compact" not in p.name) == 0
    monkeypatch.undo()
    assert TeacherBudget(BUDGET + 100, directory).lost == 50
    assert_kept(directory, snap)
    assert resume(directory, BUDGET + 100) == 50  # the rest of the budget, no more
    assert calls + first + resume.calls <= BUDGET + 100


def test_cli_verify_and_repair(filled, capsys):
    directory, calls, snap = filled
    assert cache_tool(["verify", str(directory)]) == 0
    (directory / "ledger.jsonl").write_bytes(b"garbage\n")
    assert cache_tool(["verify", str(directory)]) == 1
    assert "DAMAGED" in capsys.readouterr().out
    assert cache_tool(["repair", str(directory), "--used-at-least", "310"]) == 0
    assert "used 0 -> 310" in capsys.readouterr().out
    assert cache_tool(["verify", str(directory)]) == 0
    assert_kept(directory, snap)


def test_disk_full_during_compaction_keeps_the_fill_and_leaves_no_tmp(tmp_path, monkeypatch):
    """The fill ends by compacting its segments; a full disk there is a warning naming the file and the bytes, the
    complete cache is served from its segments, nothing is left behind, and a later run compacts for free."""
    directory = tmp_path / "cache"
    real = fmt.os.posix_fallocate

    def full_for_compaction(fd, offset, length):
        if ".compact-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, offset, length)

    monkeypatch.setattr(fmt.os, "posix_fallocate", full_for_compaction)
    teacher = CountingTeacher()
    with pytest.warns(UserWarning,
                      match=r"not compacted \(cannot write \d+ bytes to .*\.compact-.*\.seg\.tmp: No space"):
        make_datamodule(teacher, directory, BUDGET, fill_batch_size=50).fill()
    assert teacher.calls == BUDGET
    assert not list(directory.rglob("*.tmp")) and not list(directory.glob("segments/compact-*"))
    snap = _snapshot(directory)
    assert len(snap) == BUDGET and verify(directory).ok
    monkeypatch.undo()
    assert resume(directory) == 0
    assert len(list(directory.glob("segments/compact-*.seg"))) == 1
    assert_kept(directory, snap)
