"""The convergence evidence of the CPU protocol: one method's test accuracy against the schedule's length.

Reads the probe's runs, ``experiments/results/convergence/<folder>/cpu/runs/*.json`` (each made by
``python experiments/sweep_budget.py --budgets B --methods kd ckd --epochs E --out
experiments/results/convergence/<folder>``; folders ``e<E>`` at budget 2,000, ``b<B>-e<E>`` at others), and writes
``table.md`` (per method and budget: mean ± std over seeds against the schedule, the change from the previous
schedule, paired by seed, best-validation epochs) and ``accuracy_vs_epochs.png`` next to them, and the table into
README.md's convergence block. A schedule is converged for a method when the next one, half as long
again, moves its mean by less than 0.5 points.

    python experiments/convergence.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from figures import accuracy_axes, save
from readme import fill

ROOT = Path(__file__).resolve().parents[1] / "experiments" / "results" / "convergence"


Key = tuple[str, int, int]  # (method, budget, epochs)


def load(root: Path) -> dict[Key, list[dict]]:
    """``{(method, budget, epochs): [run, ...]}`` for every stored run of the probe."""
    runs: dict[Key, list[dict]] = {}
    for path in sorted(root.glob("*/cpu/runs/*.json")):
        run = json.loads(path.read_text())
        runs.setdefault((run["method"], run["budget"], run["epochs"]), []).append(run)
    return runs


def table(runs: dict[Key, list[dict]]) -> str:
    """Markdown: per method, budget and schedule, the mean ± std test accuracy, the seeds' accuracies, the change from
    the previous schedule (paired: the mean over the seeds run at both of each seed's difference) and the
    best-validation epochs."""
    lines = ["| method | budget | epochs | test acc (%) | per seed (seed: acc) | paired change from previous | "
             "best-val epochs |", "|---" * 7 + "|"]
    for method, budget in sorted({(m, b) for m, b, _ in runs}):
        previous: dict[int, float] = {}
        for epochs in sorted(e for m, b, e in runs if (m, b) == (method, budget)):
            accs = {r["seed"]: 100 * r["test_acc"] for r in runs[method, budget, epochs]}
            values = list(accs.values())
            common = sorted(set(accs) & set(previous))
            change = (f"{np.mean([accs[s] - previous[s] for s in common]):+.2f} (n={len(common)})" if common
                      else "–")
            best = ", ".join(str(r["best_epoch"]) for r in runs[method, budget, epochs] if "best_epoch" in r) or "–"
            lines.append(f"| {method} | {budget} | {epochs} | {np.mean(values):.2f} ± {np.std(values):.2f} | "
                         f"{', '.join(f'{s}: {a:.2f}' for s, a in sorted(accs.items()))} | {change} | {best} |")
            previous = accs
    return "\n".join(lines) + "\n"


def plot(runs: dict[Key, list[dict]], path: Path) -> None:
    fig, ax = accuracy_axes()
    for method, budget in sorted({(m, b) for m, b, _ in runs}):
        epochs = sorted(e for m, b, e in runs if (m, b) == (method, budget))
        accs = [[100 * r["test_acc"] for r in runs[method, budget, e]] for e in epochs]
        ax.errorbar(epochs, [np.mean(a) for a in accs], yerr=[np.std(a) for a in accs], marker="o", capsize=3,
                    label=f"{method}, budget {budget:,} (mean ± std over seeds)")
    save(fig, ax, path, "epochs (cosine schedule over the whole run)", "ResNet-20 teacher → ResNet-8 student, CIFAR-10")


def main() -> None:
    runs = load(ROOT)
    text = table(runs)
    (ROOT / "table.md").write_text(text)
    fill("convergence table", text)
    plot(runs, ROOT / "accuracy_vs_epochs.png")
    print(text)


if __name__ == "__main__":
    main()
