"""Which samples to buy, and how many views of each: ways to spend a fixed teacher budget, CIFAR-10.

Every run trains the ResNet-8 student with KD (or CKD) on ``budget`` teacher calls of the shared ResNet-20
teacher, at the sweep's CPU protocol (``experiments/sweep_budget.py``, ``--epochs`` to override), and trains the
same number of steps whatever it buys (``budget // batch`` per epoch, drawn from what is bought so far). Two kinds
of cell:

* **strategies**: the budget bought in ``rounds`` shares, a class-balanced random one before training, then one at
  each round's first epoch, chosen by the strategy from the student's scores of the samples not bought yet;
* **views** (``--views``): ``V`` teacher views of ``budget // V`` random samples, the student trained on fresh
  augmentations or on exactly the teacher's views (``matched``), all bought before training; ``--views`` also runs
  their V = 1 reference, random samples bought before training, on this machine.

Each run has a cache of its own, so its budget is really spent. Runs are resumable like the sweep's
(``<out>/runs/<name>.json``, skipped when present under the same protocol; a run cut off resumes from its last
epoch); the table (markdown + CSV, with the per-round scoring cost, the retrained rows paired by seed with the
up-front draws and, for every strategy run at two or more budgets, the teacher calls it needs to match
class-balanced random at 2,000) and the plot are rebuilt from whatever runs exist; ``--readme`` writes the table
into README.md too.

    python experiments/select_budget.py                          # KD: 2 budgets x 6 strategies x 3 seeds
    python experiments/select_budget.py --budgets 1500 --strategies margin   # a point more for calls-to-match
    python experiments/select_budget.py --strategies --views 2 4  # the view cells only (budget 2,000)
    python experiments/select_budget.py --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, ProcessPoolExecutor, wait
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import numpy as np
from figures import accuracy_axes, save
from sweep_budget import _done, _stop_workers, add_run_arguments, run_one, run_setup
from sweep_report import seed_difference

STRATEGIES = ("random", "class_balanced", "margin", "kcenter", "margin_kcenter", "badge")
REFERENCE = ("class_balanced", 2000)  # what calls-to-match is measured against


class Cell(NamedTuple):
    """One table row: what a run buys and how it trains (seeds are the row's repeats)."""

    budget: int
    method: str
    strategy: str
    rounds: int
    views: int = 1
    matched: bool = False
    buy_within: float = 1.0
    retrain: bool = False

    def name(self, seed: int) -> str:
        views = f"-v{self.views}{'matched' if self.matched else 'fresh'}" if self.views > 1 else ""
        within = f"w{self.buy_within:g}" if self.buy_within < 1 else ""
        retrain = "-retrain" if self.retrain else ""
        return f"{self.budget}-{self.method}-{self.strategy}-r{self.rounds}{within}{views}{retrain}-{seed}"

    @property
    def schedule(self) -> str:
        """The rounds column: how many, within which share of the epochs, and whether the student was retrained."""
        text = f"{self.rounds} in first {100 * self.buy_within:g}%" if self.buy_within < 1 else str(self.rounds)
        return text + ", retrained" * self.retrain

    def chooser(self) -> Cell:
        """The run whose cache a retrain trains on."""
        return self._replace(retrain=False)

    def run_args(self, seed: int, cache_root: Path) -> dict:
        """run_one's name, cache and DataModule arguments; a retrain trains from scratch on what its chooser bought
        (``selection="cached"``), recording the chooser's cell."""
        if self.retrain:
            chooser = self.chooser()
            return dict(name=self.name(seed), cache_dir=cache_root / chooser.name(seed), selection="cached",
                        record={"chosen_by": chooser._asdict()})
        within = {"buy_within": self.buy_within} if self.buy_within < 1 else {}
        return dict(name=self.name(seed), cache_dir=cache_root / self.name(seed), selection=self.strategy,
                    rounds=self.rounds, views_per_sample=self.views, matched_views=self.matched, **within)

    @classmethod
    def of(cls, run: dict) -> Cell:
        if "chosen_by" in run:
            return cls(**run["chosen_by"])._replace(retrain=True)
        s = run["selection"]
        return cls(run["budget"], run["method"], s["selection"], s["rounds"], s.get("views_per_sample", 1),
                   s.get("matched_views", False), s.get("buy_within", 1.0))


def run_cell(cell: Cell, seed: int, cfg: dict, out: Path, cache_root: Path, threads: int) -> dict | None:
    """Train one cell's seed with :func:`run_one`. A retrain whose chooser has no result yet is skipped (None; the
    next command runs it), so that a lane running beside the chooser's never trains on a purchase still being made;
    so is one whose chooser's cache is not on this machine (the chooser ran elsewhere: rerun it here to retrain)."""
    if cell.retrain:
        chooser = cell.chooser().name(seed)
        result = out / "runs" / f"{chooser}.json"
        if not result.exists():
            print(f"[{cell.name(seed)}] its chooser {chooser} has not finished; skipped here", flush=True)
            return None
        if not (cache_root / chooser).is_dir():
            print(f"[{cell.name(seed)}] its chooser {chooser} ran, but its cache {cache_root / chooser} is not on this "
                  f"machine; skipped here (remove {result} and rerun, with --retrain, to buy again and retrain)",
                  flush=True)
            return None
    return run_one(cell.budget, cell.method, seed, cfg, out, cache_root, threads, **cell.run_args(seed, cache_root))


def calls_to_match(means: dict[int, float], target: float) -> str:
    """The budget at which the piecewise-linear curve through ``{budget: mean accuracy}`` first reaches ``target``
    ("≤ b" when the smallest budget run already does, "> b" when the largest does not)."""
    budgets = sorted(means)
    if means[budgets[0]] >= target:
        return f"≤ {budgets[0]}"
    for lo, hi in zip(budgets, budgets[1:]):
        if means[hi] >= target:
            return f"{lo + (hi - lo) * (target - means[lo]) / (means[hi] - means[lo]):.0f}"
    return f"> {budgets[-1]}"


def table(runs: list[dict]) -> tuple[str, str]:
    """Markdown and CSV: per cell the mean ± std test accuracy, seeds, scoring seconds per round and fit time;
    then calls-to-match for every strategy run at two or more budgets."""
    if not runs:
        return "(not run yet)\n", ""
    cells: dict[Cell, list[dict]] = {}
    for r in runs:
        cells.setdefault(Cell.of(r), []).append(r)
    order = sorted(cells, key=lambda c: (c.views > 1, c.budget, c.method, STRATEGIES.index(c.strategy)
                                         if c.strategy in STRATEGIES else 99, c.rounds, -c.buy_within, c.retrain,
                                         c.views, c.matched))
    lines = ["| budget | method | strategy | rounds | views | test acc (%) | seeds | scoring s / round | fit min |",
             "|---" * 9 + "|"]
    csv = ["budget,method,strategy,rounds,buy_within,retrain,views,matched,mean_test_acc,std_test_acc,seeds,"
           "score_s_per_round,fit_s"]
    means: dict[Cell, float] = {}
    for c in order:
        rs = cells[c]
        acc = np.array([100 * x["test_acc"] for x in rs])
        means[c] = float(acc.mean())
        # the rounds after the first (bought before training, never scored), not replayed on a resume
        score = [e["score_s"] for x in rs for e in x["rounds_log"] if e["round"] > 0 and not e["replayed"]]
        score_s = float(np.mean(score)) if score else 0.0
        fit_s = float(np.mean([x["fit_seconds"] for x in rs]))
        views = f"{c.views} {'matched' if c.matched else 'fresh'}" if c.views > 1 else "1"
        lines.append(f"| {c.budget} | {c.method} | {c.strategy} | {c.schedule} | {views} | {acc.mean():.2f} ± "
                     f"{acc.std():.2f} | {len(rs)} | {score_s:.1f} | {fit_s / 60:.0f} |")
        csv.append(f"{c.budget},{c.method},{c.strategy},{c.rounds},{c.buy_within:g},{c.retrain},{c.views},"
                   f"{c.matched},{acc.mean():.3f},{acc.std():.3f},{len(rs)},{score_s:.2f},{fit_s:.1f}")
    text = "\n".join(lines) + ("\n\nTest accuracy at the best-validation checkpoint, mean ± std over seeds; "
                               f"{len(runs)} runs.\n") + paired(cells, order) + views_paired(cells, order)
    match = []
    # each schedule (rounds, buy_within, retrained or not) is matched against the reference cell with that schedule
    for ref in sorted({c._replace(budget=REFERENCE[1], strategy=REFERENCE[0]) for c in means if c.views == 1}):
        if ref not in means:
            continue
        for strategy in STRATEGIES:
            if strategy == REFERENCE[0]:  # the reference matches itself at its own budget: no row
                continue
            same = ref._replace(budget=0, strategy=strategy)
            curve = {c.budget: m for c, m in means.items() if c._replace(budget=0) == same}
            if len(curve) >= 2:
                match.append(f"| {strategy} | {ref.method} | {ref.schedule} | {', '.join(map(str, sorted(curve)))} | "
                             f"{calls_to_match(curve, means[ref])} |")
    if match:
        text += (f"\nTeacher calls needed to match {REFERENCE[0]} at {REFERENCE[1]} with the same method and rounds "
                 "(linear between the budgets run):\n\n| strategy | method | rounds | budgets run | calls to match |\n"
                 + "|---" * 5 + "|\n" + "\n".join(match) + "\n")
    return text, "\n".join(csv) + "\n"


def _references(c: Cell) -> dict[str, Cell]:
    """The rows a retrained row is paired with: class-balanced and random rounds with its schedule, retrained (their
    rounds buy a class-balanced, resp. random, draw of the budget: the two up-front draws, trained from scratch),
    and random samples bought before training (one round)."""
    return {"class_balanced": c._replace(strategy="class_balanced"), "random": c._replace(strategy="random"),
            "random, up front": Cell(c.budget, c.method, "random", 1)}


def paired(cells: dict[Cell, list[dict]], order: list[Cell]) -> str:
    """Markdown: each retrained row minus its :func:`_references`, paired by seed (a seed fixes the first round's
    samples and the student's initialisation); "" when no retrained row has a reference yet."""
    acc = {c: {r["seed"]: 100 * r["test_acc"] for r in rs} for c, rs in cells.items()}
    rows = []
    for c in order:
        if not c.retrain:
            continue
        diffs = [seed_difference(acc[c], acc[r]) if r in acc and r != c else "–" for r in _references(c).values()]
        if any(d != "–" for d in diffs):
            rows.append(f"| {c.budget} | {c.method} | {c.strategy} | {c.schedule} | " + " | ".join(diffs) + " |")
    if not rows:
        return ""
    head = list(_references(order[0]))  # the same column names for every row
    return ("\nRetrained rows against the up-front draws, paired by seed (mean; each seed's; ahead on how many):\n\n"
            "| budget | method | strategy | rounds | " + " | ".join(f"minus {h}" for h in head) + " |\n"
            + "|---" * (4 + len(head)) + "|\n" + "\n".join(rows) + "\n")


def views_paired(cells: dict[Cell, list[dict]], order: list[Cell]) -> str:
    """Markdown: each view row (V > 1) minus its V = 1 reference (random, one round, the same budget), paired by
    seed (a seed fixes the random draw and the student's initialisation); "" when no view row has a reference yet."""
    acc = {c: {r["seed"]: 100 * r["test_acc"] for r in rs} for c, rs in cells.items()}
    rows = []
    for c in order:
        reference = Cell(c.budget, c.method, "random", 1)
        if c.views > 1 and reference in acc and (d := seed_difference(acc[c], acc[reference])) != "–":
            rows.append(f"| {c.budget} | {c.views} {'matched' if c.matched else 'fresh'} | {d} |")
    if not rows:
        return ""
    return ("\nView rows against one view per sample (the same calls, random samples, bought up front), paired by "
            "seed:\n\n| budget | views | minus 1 view |\n|---|---|---|\n" + "\n".join(rows) + "\n")


def report(out: Path, readme: bool = False) -> str:
    """Rebuild ``table.md``, ``table.csv`` and ``accuracy_vs_budget.png`` from the stored runs (and README.md's
    selection block with ``readme``)."""
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    text, csv = table(runs)
    (out / "table.md").write_text(text)
    (out / "table.csv").write_text(csv)
    if readme:
        from readme import fill

        fill("selection table", text)
    plot(runs, out / "accuracy_vs_budget.png")
    return text


def plot(runs: list[dict], path: Path) -> None:
    """Accuracy vs budget, mean ± std over seeds, one colour per strategy: the students retrained on what each
    strategy bought (solid: these compare the choices), the students that chose, in rounds (dotted), and random
    samples bought before training (black, dashed). Early one-seed schedules are in the table only."""
    import matplotlib.pyplot as plt

    lines: dict[tuple[str, str, str], dict[int, list[float]]] = {}
    for r in runs:
        c = Cell.of(r)
        if c.views > 1 or (c.rounds > 1 and c.buy_within == 1.0):
            continue
        kind = "up front" if c.rounds == 1 else "retrained" if c.retrain else "in rounds"
        lines.setdefault((c.method, c.strategy, kind), {}).setdefault(c.budget, []).append(100 * r["test_acc"])
    colours = plt.get_cmap("tab10").colors
    style = {"retrained": dict(ls="-", lw=2, marker="o"), "in rounds": dict(ls=":", lw=1, marker="o"),
             "up front": dict(ls="--", lw=2, marker="s", zorder=3)}
    fig, ax = accuracy_axes()
    for (method, strategy, kind), points in sorted(lines.items(), key=lambda x: (x[0][2] != "up front", x[0])):
        b = sorted(points)
        known = STRATEGIES.index(strategy) if strategy in STRATEGIES else len(STRATEGIES)  # e.g. entropy
        colour = "black" if kind == "up front" else colours[known % len(colours)]
        ax.errorbar(b, [np.mean(points[x]) for x in b], yerr=[np.std(points[x]) for x in b], capsize=3,
                    color=colour, label=f"{method}, {strategy}, {kind}", **style[kind])
    save(fig, ax, path, "teacher calls (budget)", "Choosing what the teacher sees (ResNet-8 student)",
         legend_outside=True)


def plan(args: argparse.Namespace) -> list[Cell]:
    """The cells a command line asks for, each retrain after its chooser (:func:`run_all` waits for it). The
    view cells come with their V = 1 reference: random samples, one round, the same budget, on this machine (a
    machine moves a run by up to ~2 points, so the budget sweep's KD cell is no reference for them)."""
    cells = [Cell(b, m, s, args.rounds, buy_within=args.buy_within)
             for b in args.budgets for m in args.methods for s in args.strategies]
    if args.views:
        cells.append(Cell(args.views_budget, "kd", "random", 1))
        cells += [Cell(args.views_budget, "kd", "random", 1, v, matched) for v in args.views if v > 1
                  for matched in (False, True)]
    if args.retrain:
        cells = [x for c in cells for x in ((c, c._replace(retrain=True)) if c.views == 1 and c.rounds > 1 else (c,))]
    return list(dict.fromkeys(cells))  # once each, in order


def parser() -> argparse.ArgumentParser:
    """The command line (``--help``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=int, nargs="+", default=[1000, 2000])
    p.add_argument("--methods", nargs="+", default=["kd"], choices=("kd", "ckd", "ckd_kl3"))
    p.add_argument("--strategies", nargs="*", default=list(STRATEGIES), help="none: the view cells only")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--buy-within", type=float, default=1.0, help="every round bought within this share of the epochs")
    p.add_argument("--retrain", action="store_true", help="after each strategy run, train a new student from scratch "
                   "on what it bought (selection='cached'; 0 teacher calls)")
    p.add_argument("--views", type=int, nargs="*", default=[], help="view cells: V views per sample, fresh and "
                   "matched, KD, random samples, one round, at --views-budget (with their V = 1 reference)")
    p.add_argument("--views-budget", type=int, default=2000)
    add_run_arguments(p, "select_budget")
    return p


def run_all(todo: list[tuple[Cell, int]], pool: Executor, run: Callable[[Cell, int], dict | None]) -> Iterator:
    """Run every (cell, seed) of ``todo`` on ``pool``, yielding each result as it comes. A retrain whose chooser is
    in ``todo`` is submitted only once the chooser has returned: started beside it on a second worker, it would find
    no result yet and skip (:func:`run_cell`)."""
    after = {(c.chooser(), seed): (c, seed) for c, seed in todo if c.retrain and (c.chooser(), seed) in todo}
    waiting = set(after.values())
    running = {pool.submit(run, c, seed): (c, seed) for c, seed in todo if (c, seed) not in waiting}
    while running:
        for fut in wait(running, return_when=FIRST_COMPLETED).done:
            if (retrain := after.get(running.pop(fut))) is not None:
                running[pool.submit(run, *retrain)] = retrain
            yield fut.result()


def main() -> None:
    args = parser().parse_args()
    cfg, out, cache_root = run_setup(args, "select_budget")
    if args.report_only:
        print(report(out, args.readme))
        return
    cells = plan(args)
    todo = [(c, seed) for seed in args.seeds for c in cells if not _done(out / "runs" / f"{c.name(seed)}.json", cfg)]
    print(f"{len(todo)} runs to do ({args.workers} workers x {args.threads} threads); results in {out}")
    os.environ.setdefault("WANDB_MODE", "disabled")
    signal.signal(signal.SIGTERM, _stop_workers)  # kill stops the runs in flight too
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        run = partial(run_cell, cfg=cfg, out=out, cache_root=cache_root, threads=args.threads)
        for r in run_all(todo, pool, run):
            if r is None:  # another process is training it (or its chooser)
                continue
            print(f"{Cell.of(r).name(r['seed'])}: test acc {100 * r['test_acc']:.2f}% ({r['fit_seconds']:.0f} s, "
                  f"{r['new_teacher_calls']} teacher calls)", flush=True)
            report(out, args.readme)
    print(report(out, args.readme))


if __name__ == "__main__":
    main()
