"""The convergence evidence of the CPU protocol: one method's test accuracy against the schedule's length.

Reads the probe's runs, ``experiments/results/convergence/e<epochs>/cpu/runs/*.json`` (each made by
``python experiments/sweep_budget.py --budgets 2000 --methods kd ckd --epochs <epochs> --out
experiments/results/convergence/e<epochs>``), and writes ``table.md`` (mean ± std over seeds, the change from the
previous schedule, paired by seed, best-validation epochs) and ``accuracy_vs_epochs.png`` next to them, and the
table into README.md's convergence block. A schedule is converged for a method when the next one, half as long
again, moves its mean by less than 0.5 points.

    python experiments/convergence.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from readme import fill

ROOT = Path(__file__).resolve().parents[1] / "experiments" / "results" / "convergence"


def load(root: Path) -> dict[tuple[str, int], list[dict]]:
    """``{(method, epochs): [run, ...]}`` for every stored run of the probe."""
    runs: dict[tuple[str, int], list[dict]] = {}
    for path in sorted(root.glob("e*/cpu/runs/*.json")):
        epochs = int(re.fullmatch(r"e(\d+)", path.parents[2].name).group(1))
        run = json.loads(path.read_text())
        runs.setdefault((run["method"], epochs), []).append(run)
    return runs


def table(runs: dict[tuple[str, int], list[dict]]) -> str:
    """Markdown: per method and schedule, the mean ± std test accuracy, the seeds' accuracies, the change from
    the previous schedule (paired: the mean over the seeds run at both of each seed's difference) and the
    best-validation epochs."""
    lines = ["| method | epochs | test acc (%) | per seed (seed: acc) | paired change from previous | best-val epochs |",
             "|---" * 6 + "|"]
    for method in sorted({m for m, _ in runs}):
        previous: dict[int, float] = {}
        for epochs in sorted(e for m, e in runs if m == method):
            accs = {r["seed"]: 100 * r["test_acc"] for r in runs[method, epochs]}
            values = list(accs.values())
            common = sorted(set(accs) & set(previous))
            change = (f"{np.mean([accs[s] - previous[s] for s in common]):+.2f} (n={len(common)})" if common
                      else "–")
            best = ", ".join(str(r["best_epoch"]) for r in runs[method, epochs] if "best_epoch" in r) or "–"
            lines.append(f"| {method} | {epochs} | {np.mean(values):.2f} ± {np.std(values):.2f} | "
                         f"{', '.join(f'{s}: {a:.2f}' for s, a in sorted(accs.items()))} | {change} | {best} |")
            previous = accs
    return "\n".join(lines) + "\n"


def plot(runs: dict[tuple[str, int], list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({m for m, _ in runs}):
        epochs = sorted(e for m, e in runs if m == method)
        accs = [[100 * r["test_acc"] for r in runs[method, e]] for e in epochs]
        ax.errorbar(epochs, [np.mean(a) for a in accs], yerr=[np.std(a) for a in accs], marker="o", capsize=3,
                    label=f"{method} (mean ± std over seeds)")
    ax.set_xlabel("epochs (cosine schedule over the whole run)")
    ax.set_ylabel("CIFAR-10 test accuracy (%)")
    ax.set_title("Budget 2,000, ResNet-20 teacher → ResNet-8 student")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    runs = load(ROOT)
    text = table(runs)
    (ROOT / "table.md").write_text(text)
    fill("convergence table", text)
    plot(runs, ROOT / "accuracy_vs_epochs.png")
    print(text)


if __name__ == "__main__":
    main()
