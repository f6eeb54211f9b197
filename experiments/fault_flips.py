"""Flip one random byte of one random cache file, N times (a fresh copy of a filled cache each time), and check:

1. teacher calls over the fill and a resume stay within the budget;
2. every row served after open (or, when refused, after ``repair``) equals the original bytes.

``python experiments/fault_flips.py [--trials 100] [--seed 0]`` prints how many trials opened as they were, were
refused and repaired, or could not be repaired, and exits 1 if any invariant failed.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from teachers_for_tests import CountingTeacher, make_datamodule  # noqa: E402

from lightning_kd.cache import TeacherBudgetExceeded, TeacherCache  # noqa: E402
from lightning_kd.cache.repair import repair  # noqa: E402

BUDGET = 300


def rows(cache: TeacherCache) -> dict[int, bytes]:
    values = cache.get(cache.indices).numpy()
    return {int(i): values[j].tobytes() for j, i in enumerate(cache.indices)}


def trial(template: Path, original: dict[int, bytes], work: Path, rng: np.random.Generator) -> tuple[str, str, list]:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(template, work)
    files = sorted(p for p in work.rglob("*") if p.is_file() and p.stat().st_size and p.name != "lock")
    path = files[rng.integers(len(files))]
    data = bytearray(path.read_bytes())
    at = int(rng.integers(len(data)))
    data[at] ^= int(rng.integers(1, 256))
    path.write_bytes(bytes(data))
    where, failures = f"{path.relative_to(work)}@{at}", []
    try:
        TeacherCache(work)
        outcome = "opened as it was"
    except Exception as err:  # noqa: BLE001 - any refusal is counted; the invariants below decide
        outcome = f"refused ({type(err).__name__})"
        try:
            repair(work)
            outcome += ", repaired"
        except Exception as rep:  # noqa: BLE001
            return outcome + f", repair refused ({type(rep).__name__}: {str(rep)[:80]})", where, failures
    served = rows(TeacherCache(work))
    failures += [f"row {i} changed" for i, b in served.items() if original.get(i) != b]
    teacher = CountingTeacher()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_datamodule(teacher, work, BUDGET, fill_batch_size=50).fill()
    except TeacherBudgetExceeded:
        pass
    if BUDGET + teacher.calls > BUDGET:  # the fill that made the template spent the whole budget
        failures.append(f"resume made {teacher.calls} teacher calls beyond the budget")
    return outcome, where, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "template"
        teacher = CountingTeacher()
        make_datamodule(teacher, template, BUDGET, fill_batch_size=50).fill()
        assert teacher.calls == BUDGET
        original = rows(TeacherCache(template))
        counts, bad = collections.Counter(), []
        for t in range(args.trials):
            outcome, where, failures = trial(template, original, Path(tmp) / "work", rng)
            counts[outcome] += 1
            bad += [f"trial {t} ({where}): {f}" for f in failures]
            if "repair refused" in outcome:
                print(f"trial {t} ({where}): {outcome}")
    for outcome, n in counts.most_common():
        print(f"{n:4d}  {outcome}")
    print("\n".join(bad) or f"invariants held in all {args.trials} trials")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
