"""The budget sweep's report: its table (markdown, CSV), the README's result blocks and the accuracy-vs-budget
plot, rebuilt from whatever runs ``experiments/sweep_budget.py`` has stored."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from figures import accuracy_axes, save
from methods import GRID, METHODS
from readme import fill

# The runs of the feature-level CKD evidence (budget 2,000, one machine), its seed-paired contrasts (a minus b: each
# feature loss's CKD form against its white-box baseline, the teacher's view against a fresh crop, CRD against the KD
# it adds to, CKD inside GPD against GPD-KD and against CKD), and CKD's combine ablations in the budget sweep.
EVIDENCE = ("kd", "ckd", "crd", "hint", "ckd_hint", "hint_teacher_view", "ckd_hint_teacher_view", "vid", "ckd_vid",
            "vid_teacher_view", "cc", "ckd_cc", "cc_teacher_view", "gpd", "gpd_ckd")
EVIDENCE_CONTRASTS = (("ckd_hint", "hint"), ("ckd_vid", "vid"), ("ckd_cc", "cc"),
                      ("ckd_hint_teacher_view", "hint_teacher_view"), ("hint_teacher_view", "hint"),
                      ("vid_teacher_view", "vid"), ("cc_teacher_view", "cc"),
                      ("ckd_hint_teacher_view", "ckd_hint"), ("ckd_hint", "ckd"), ("crd", "kd"), ("gpd_ckd", "gpd"),
                      ("gpd_ckd", "ckd"))
ABLATIONS = ("ce", "kd", "ckd", "ckd_average", "ckd_mixup", "gpd", "gpd_scratch")


def _cpu_only(run: dict) -> bool:
    """Whether every epoch of ``run`` ran on a CPU (runs before the ``devices`` record: their one ``device``)."""
    return all(d["device"] == "cpu" for d in run.get("devices") or [{"device": run.get("device", "cpu")}])


def table(runs: list[dict], methods: list[str] | None = None, budgets: list[int] | None = None) -> tuple[str, str]:
    """Markdown and CSV of ``runs``: per method (and GPD's dynamic teacher, ``<method>/dt``) and budget, mean ± std
    test accuracy over seeds, the number of seeds and the mean fit time per run (on one CPU core; a cell with runs
    that ran at least partly on a GPU shows ``GPU`` instead: that time measures nothing); only ``methods`` / ``budgets``
    when given (in the order given)."""
    budgets = budgets or sorted({r["budget"] for r in runs})
    names = {r["method"] for r in runs}
    methods = [m for m in (methods or [*METHODS, *sorted(names - set(METHODS))]) if m in names]
    rows = []  # (row label, method, result key)
    for m in methods:
        rows.append((m, m, "test_acc"))
        if any("dt_test_acc" in r for r in runs if r["method"] == m):
            rows.append((f"{m}/dt", m, "dt_test_acc"))
    lines = ["| method | " + " | ".join(f"budget {b}" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    csv = ["method,budget,mean_test_acc,std_test_acc,seeds,mean_fit_seconds,cpu_only"]
    for row, m, key in rows:
        cells = []
        for b in budgets:
            cell = [r for r in runs if r["method"] == m and r["budget"] == b and key in r]
            if not cell:
                cells.append("–")
                continue
            acc, fit = np.array([100 * r[key] for r in cell]), np.mean([r["fit_seconds"] for r in cell])
            cpu = all(_cpu_only(r) for r in cell)
            cells.append(f"{acc.mean():.2f} ± {acc.std():.2f} (n={len(acc)}, "
                         f"{f'{fit / 60:.0f} min' if cpu else 'GPU'})")
            csv.append(f"{row},{b},{acc.mean():.3f},{acc.std():.3f},{len(acc)},{fit:.1f},{int(cpu)}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    used = [r for r in runs if r["method"] in methods and r["budget"] in budgets]
    dt_note = " (`<method>/dt`: a GPD run's dynamic teacher)" if any("/" in row for row, _, _ in rows) else ""
    text = ("\n".join(lines) + "\n\nTest accuracy (%) at the best-validation checkpoint, mean ± std over seeds "
            f"(n; mean fit time per run on one CPU core){dt_note}; {len(used)} runs, "
            f"{sum(r['fit_seconds'] for r in used if _cpu_only(r)) / 3600:.2f} h of CPU fit time in all.\n")
    gpu = [r for r in used if not _cpu_only(r)]
    if gpu:
        text += (f"GPU: {len(gpu)} runs ran at least partly on a GPU, many at once, so their fit time measures nothing "
                 "(same protocol, same steps).\n")
    spans = []  # where the best-validation epoch fell: a converged run peaks before its last epoch
    for m in methods:
        best = [(r["best_epoch"], r["epochs"]) for r in used if r["method"] == m and "best_epoch" in r]
        if best:
            spans.append(f"{m} {min(b for b, _ in best)}–{max(b for b, _ in best)} of {max(e for _, e in best)}")
    if spans:
        text += f"Best-validation epochs (min–max over runs): {', '.join(spans)}.\n"
    cpus = Counter(r["machine"].get("cpu_model", "?") for r in used if _cpu_only(r) and "machine" in r)
    if cpus:  # a machine moves a run by up to ~2 points: say which CPUs this table's runs had
        text += "CPUs: " + ", ".join(f"{m} ({n} runs)" for m, n in cpus.most_common()) + ".\n"
    return text, "\n".join(csv) + "\n"


def seed_difference(a: dict[int, float], b: dict[int, float]) -> str:
    """``a`` minus ``b`` (accuracies by seed), paired by seed: the mean difference, each seed's, and on how many
    ``a`` is ahead; "–" when they share no seed."""
    d = [a[s] - b[s] for s in sorted(a.keys() & b.keys())]
    if not d:
        return "–"
    return f"{np.mean(d):+.2f} ({', '.join(f'{x:+.1f}' for x in d)}; ahead on {sum(x > 0 for x in d)} of {len(d)})"


def _by_seed(runs: list[dict], method: str, budget: int) -> dict[int, float]:
    return {r["seed"]: 100 * r["test_acc"] for r in runs if r["method"] == method and r["budget"] == budget}


def paired(runs: list[dict], reference: str = "ckd", methods: list[str] | None = None,
           budgets: list[int] | None = None) -> str:
    """Markdown: ``reference`` minus each other method, paired by seed (a seed fixes the samples, their teacher
    outputs and the initialisation, so the pair differs only by the method): the mean difference, each seed's,
    and on how many of them the reference is ahead."""
    budgets = budgets or sorted({r["budget"] for r in runs})
    names = {r["method"] for r in runs} - {reference}
    methods = [m for m in (methods or [*METHODS, *sorted(names - set(METHODS))]) if m in names]
    lines = [f"| {reference} minus | " + " | ".join(f"budget {b}" for b in budgets) + " |",
             "|---" * (len(budgets) + 1) + "|"]
    for m in methods:
        cells = [seed_difference(_by_seed(runs, reference, b), _by_seed(runs, m, b)) for b in budgets]
        if any(c != "–" for c in cells):
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def contrasts(runs: list[dict], pairs: tuple[tuple[str, str], ...], budget: int) -> str:
    """Markdown: each pair's ``a`` minus ``b`` at ``budget``, paired by seed (as :func:`paired`); a pair with no
    shared seed yet is left out (and a line says so when none has one)."""
    rows = [(a, b, seed_difference(_by_seed(runs, a, budget), _by_seed(runs, b, budget))) for a, b in pairs]
    rows = [f"| {a} minus {b} | {cell} |" for a, b, cell in rows if cell != "–"]
    if not rows:
        return "No pair has finished yet.\n"
    return "\n".join([f"| a minus b, budget {budget} | difference |", "|---|---|", *rows]) + "\n"


# The README's result blocks (``--readme``) of each results folder (``--out``'s name): block name -> its text from
# the folder's runs. A block never mixes two folders' runs (two machines: a machine moves a run by up to ~2 points).
README_BLOCKS = {
    "budget_sweep": {
        "budget sweep table": lambda runs: table(runs, list(GRID))[0],
        "ckd paired table": lambda runs: paired(runs, "ckd", list(GRID)),
        "ckd ablation table": lambda runs: table(runs, list(ABLATIONS), [2000])[0],
    },
    "ckd_evidence": {
        "ckd evidence table": lambda runs: table(runs, list(EVIDENCE), [2000])[0],
        "ckd evidence contrasts": lambda runs: contrasts(runs, EVIDENCE_CONTRASTS, 2000),
    },
}


def report(out: Path, readme: bool = False) -> str:
    """Rebuild ``table.md``, ``table.csv`` and ``accuracy_vs_budget.png`` from the stored runs; with ``readme``, the
    README's blocks of :data:`README_BLOCKS` too."""
    folder = out.parent.name  # <folder>/<protocol>
    if readme and folder not in README_BLOCKS:
        raise SystemExit(f"--readme: the README has no result blocks for the runs in {out.parent} (it has blocks for "
                         f"{', '.join(README_BLOCKS)} under experiments/results/)")
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    text, csv = table(runs)
    (out / "table.md").write_text(text + "\n" + paired(runs))
    (out / "table.csv").write_text(csv)
    if readme:
        for block, make in README_BLOCKS[folder].items():
            fill(block, make(runs))

    budgets = sorted({r["budget"] for r in runs})
    fig, ax = accuracy_axes()
    any_partial = False
    for color, m in enumerate(GRID):  # the default grid's methods
        pts = []
        for b in budgets:
            accs = [100 * r["test_acc"] for r in runs if r["method"] == m and r["budget"] == b]
            if accs:
                pts.append((b, np.mean(accs), np.std(accs), len(accs)))
        if pts:
            b_, mean, std, n = zip(*pts)
            style = dict(lw=2, marker="s" if m == "ckd" else "^", ls="-" if m == "ckd" else "--") if m.startswith(
                "ckd") else dict(lw=1, marker="o")  # the CKD releases stand out, and apart from each other
            ax.errorbar(b_, mean, yerr=std, capsize=3, label=m, color=f"C{color}", **style)
            partial = [i for i, k in enumerate(n) if k < 3]  # open markers: a cell still short of its 3 seeds
            ax.plot([b_[i] for i in partial], [mean[i] for i in partial], ls="none", marker=style["marker"],
                    mfc="white", mec=f"C{color}", zorder=3)
            any_partial |= bool(partial)
    if any_partial:
        ax.plot([], [], ls="none", marker="o", mfc="white", mec="gray", label="open: < 3 seeds so far")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(budgets, [str(b) for b in budgets])
    save(fig, ax, out / "accuracy_vs_budget.png", "teacher budget (training images with teacher outputs)",
         "ResNet-20 teacher → ResNet-8 student")
    return text
