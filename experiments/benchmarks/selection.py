"""Section 8: the cost of one selection round on CIFAR-10 — the student scoring the pool, then each strategy.

A round of ``CachedTeacherDataModule(rounds=R)`` runs the student (forward only, eval view) on every training
sample not bought yet plus those bought, then the strategy chooses the next share. Timed here at the sizes of a
budget-2,000, four-round run's second round: 500 bought, 44,500 candidates (the rest of the 45,000 training
images; ResNet-8: 64-d embeddings), 500 to choose. No teacher call is involved.
``run(...)`` returns the result as a dict.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.common import summary

STRATEGIES = ("random", "class_balanced", "entropy", "margin", "kcenter", "margin_kcenter", "badge")


def run(student: str = "resnet8", bought: int = 500, choose: int = 500, repeats: int = 3,
        pool_limit: int | None = None) -> dict:
    """Seconds to score the pool (median of ``repeats``) and to select with each strategy on those scores."""
    from lightning_kd.data import CIFAR10DataModule
    from lightning_kd.data.rounds import score_samples
    from lightning_kd.models import create_model
    from lightning_kd.selection import PoolScores, SelectionContext, create_strategy

    dm = CIFAR10DataModule()
    dm.setup("fit")
    rng = np.random.default_rng(0)
    pool = dm.train_indices if pool_limit is None else np.sort(rng.choice(dm.train_indices, pool_limit, False))
    chosen = np.sort(rng.choice(pool, bought, replace=False))
    candidates = np.setdiff1d(pool, chosen)
    model = create_model(student, num_classes=10)
    dataset = dm.make_dataset(np.concatenate([candidates, chosen]), "eval")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        z, e = score_samples(model, dataset, batch_size=512, device=None)
        times.append(time.perf_counter() - start)
    p = len(candidates)
    scores = PoolScores(z[:p], e[:p], z[p:], e[p:])
    targets = dm.targets
    select_s = {}
    for name in STRATEGIES:
        strategy = create_strategy(name)
        ctx = SelectionContext(pool=candidates, targets=targets(candidates), n=choose, seed=0, round=1, chosen=chosen,
                               chosen_targets=targets(chosen), scores=scores if strategy.needs_student else None)
        start = time.perf_counter()
        strategy.select(ctx)
        select_s[name] = time.perf_counter() - start
    return {"student": student, "candidates": p, "bought": bought, "choose": choose, "embedding": int(e.shape[1]),
            "threads": torch.get_num_threads(), "score_s": summary(times),
            "score_s_per_1000": 1000 * float(np.median(times)) / (p + bought), "select_s": select_s}


if __name__ == "__main__":
    import json
    import sys

    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    print(json.dumps(run(), indent=1))
