"""Which samples to buy: selection strategies over rounds at a fixed teacher budget, CIFAR-10.

Every run trains the ResNet-8 student with KD (or CKD) on ``budget`` teacher calls of the shared ResNet-20
teacher, bought in ``rounds`` shares: a class-balanced random one before training, then one at each round's first
epoch, chosen by the strategy from the student's scores of the samples not bought yet. Every run, whatever its
strategy and rounds, trains the same number of steps (``budget // batch`` per epoch, drawn from what is bought so
far), at the sweep's CPU protocol (``experiments/sweep_budget.py``, ``--epochs`` to override). Each (budget,
method, strategy, rounds, seed) has a cache of its own, so its budget is really spent.

Runs are resumable (``<out>/runs/<name>.json``, skipped when present); the table (markdown + CSV), with the
per-round scoring cost, is rebuilt from whatever runs exist.

    python experiments/select_budget.py                          # the KD grid: 2 budgets x 6 strategies x 3 seeds
    python experiments/select_budget.py --methods ckd --strategies margin --budgets 1000 2000
    python experiments/select_budget.py --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from sweep_budget import PROTOCOLS, ROOT, _done, _stop_workers, run_one

STRATEGIES = ("random", "class_balanced", "margin", "kcenter", "margin_kcenter", "badge")


def run_name(budget: int, method: str, strategy: str, rounds: int, seed: int) -> str:
    return f"{budget}-{method}-{strategy}-r{rounds}-{seed}"


def report(out: Path) -> str:
    """Rebuild ``table.md`` and ``table.csv``: mean ± std test accuracy per cell, and scoring seconds per round."""
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    cells: dict[tuple, list[dict]] = {}
    for r in runs:
        key = (r["budget"], r["method"], r["selection"]["selection"], r["selection"]["rounds"])
        cells.setdefault(key, []).append(r)
    lines = ["| budget | method | strategy | rounds | test acc (%) | seeds | scoring s / round | fit s |",
             "|---|---|---|---|---|---|---|---|"]
    csv = ["budget,method,strategy,rounds,mean_test_acc,std_test_acc,seeds,score_s_per_round,fit_s"]
    for (b, m, s, r), rs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], STRATEGIES.index(kv[0][2])
                                                                  if kv[0][2] in STRATEGIES else 99, kv[0][3])):
        acc = np.array([100 * x["test_acc"] for x in rs])
        score = [e["score_s"] for x in rs for e in x["rounds_log"] if not e["replayed"]]
        score_s = float(np.mean(score)) if score else 0.0
        fit_s = float(np.mean([x["fit_seconds"] for x in rs]))
        lines.append(f"| {b} | {m} | {s} | {r} | {acc.mean():.2f} ± {acc.std():.2f} | {len(rs)} | {score_s:.1f} | "
                     f"{fit_s:.0f} |")
        csv.append(f"{b},{m},{s},{r},{acc.mean():.3f},{acc.std():.3f},{len(rs)},{score_s:.2f},{fit_s:.1f}")
    table = "\n".join(lines) + (f"\n\nTest accuracy at the best-validation checkpoint, mean ± std over seeds; "
                                f"{len(runs)} runs.\n")
    (out / "table.md").write_text(table)
    (out / "table.csv").write_text("\n".join(csv) + "\n")
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=int, nargs="+", default=[1000, 2000])
    p.add_argument("--methods", nargs="+", default=["kd"], choices=("kd", "ckd", "ckd_kl3"))
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--protocol", choices=PROTOCOLS, default="cpu")
    p.add_argument("--epochs", type=int, help="override the protocol's epochs")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--accelerator", default="auto", help="as in sweep_budget.py: a GPU when there is one")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "select_budget")
    p.add_argument("--cache-root", type=Path, default=None, help="default: $LKD_CACHE_DIR/select_budget")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    cfg = dict(PROTOCOLS[args.protocol], protocol=args.protocol, accelerator=args.accelerator)
    if args.epochs:
        cfg["epochs"] = args.epochs
    out = args.out / args.protocol
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if args.report_only:
        print(report(out))
        return
    from lightning_kd.data.cifar import default_cache_dir

    cache_root = args.cache_root or default_cache_dir() / "select_budget"
    todo = []
    for seed in args.seeds:
        for b in args.budgets:
            for m in args.methods:
                for s in args.strategies:
                    name = run_name(b, m, s, args.rounds, seed)
                    if not _done(out / "runs" / f"{name}.json", cfg):
                        todo.append((b, m, s, seed, name))
    print(f"{len(todo)} runs to do ({args.workers} workers x {args.threads} threads); results in {out}")
    os.environ.setdefault("WANDB_MODE", "disabled")
    signal.signal(signal.SIGTERM, _stop_workers)  # kill stops the runs in flight too
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(run_one, b, m, seed, cfg, out, cache_root, args.threads, name=name,
                        cache_dir=cache_root / name, selection=s, rounds=args.rounds)
            for b, m, s, seed, name in todo
        ]
        for fut in as_completed(futures):
            r = fut.result()
            print(f"{r['budget']} {r['method']} {r['selection']['selection']} seed {r['seed']}: test acc "
                  f"{100 * r['test_acc']:.2f}% ({r['fit_seconds']:.0f} s, {r['new_teacher_calls']} teacher calls)",
                  flush=True)
            report(out)
    print(report(out))


if __name__ == "__main__":
    main()
