"""Teacher features in the cache: disk per sample and the budgeted fill's speed, with features vs logits only.

The shared ResNet-20 (its state dict as ``resnet20_rgb``, so that its layers can be hooked) fills a fresh cache of
``samples`` CIFAR-10 training images (the teacher's fixed views, raw RGB) through ``fill_cache`` with a
``TeacherBudget``, batch ``batch_size``, once per variant and repeat, interleaved (``time_interleaved``; creating
the empty cache is not timed): logits only (float32), and logits + the features each official white-box method
uses, stored in float16: hint (stage 2, ``net.layer2``), VID (the three stage outputs), CC (the pooled
penultimate feature). ``bytes_per_sample``: the live segment files' size over the samples (index, row, checksums,
headers); ``row_bytes``: the stored row alone.

    python experiments/benchmarks/features.py [threads] [samples]    # writes experiments/results/features_fill_cpu.json
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ROOT, summary, time_interleaved  # noqa: E402

VARIANTS = {
    "logits": {},
    "hint": {"stage2": "net.layer2"},
    "vid": {"stage1": "net.layer1", "stage2": "net.layer2", "stage3": "net.layer3"},
    "cc": {"pool": "net.avgpool"},
}


def run(samples: int = 2000, batch_size: int = 500, warmup: int = 1, repeats: int = 5) -> dict:
    from lightning_kd.cache import CacheSpec, TeacherBudget, TeacherCache
    from lightning_kd.cache.spec import FeatureSpec
    from lightning_kd.data import CIFAR10DataModule
    from lightning_kd.data.fill import fill_cache
    from lightning_kd.data.plan import resolve_teacher
    from lightning_kd.teachers.features import FeatureTeacher

    dm = CIFAR10DataModule()
    dm.setup("fit")
    dataset = dm.make_dataset(dm.train_indices[:samples], "fixed", normalize=False)
    base = resolve_teacher({"model": "resnet20_rgb", "num_classes": 10,
                            "weights": "cifar10_resnet20_teacher.state_dict.pt"})
    teachers, specs = {}, {}
    for name, layers in VARIANTS.items():
        teacher = FeatureTeacher(base, layers) if layers else base
        shapes = teacher.feature_shapes((3, 32, 32)) if layers else {}
        features = tuple(FeatureSpec(n, layer, shapes[n]) for n, layer in layers.items())
        teachers[name] = teacher
        specs[name] = CacheSpec("bench-teacher", dm.fingerprint(), "fixed", 10, "float32", features=features,
                                feature_dtype="float16" if features else None)
    root = Path(tempfile.mkdtemp(prefix="lkd-bench-features-"))
    state: dict = {}

    def fresh(name: str):
        def prepare() -> None:
            shutil.rmtree(root / name, ignore_errors=True)
            state[name] = TeacherCache(root / name, specs[name]), TeacherBudget(samples, root / name)
        return prepare

    def fill(name: str):
        return lambda: fill_cache(teachers[name], dataset, *state[name], batch_size=batch_size, progress=False)

    try:
        times = time_interleaved({n: fill(n) for n in VARIANTS}, warmup, repeats,
                                 prepare={n: fresh(n) for n in VARIANTS})
        disk = {n: sum(p.stat().st_size for p in (root / n / "segments").glob("*.seg")) for n in VARIANTS}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    logits_t = np.asarray(times["logits"])
    out = {"samples": samples, "batch_size": batch_size, "threads": torch.get_num_threads(), "variants": {}}
    for name in VARIANTS:
        t = np.asarray(times[name])
        spec = specs[name]
        out["variants"][name] = {
            "layers": VARIANTS[name],
            "values_per_sample": spec.num_classes + sum(f.size for f in spec.features),
            "row_bytes": spec.width * spec.storage.itemsize,
            "bytes_per_sample": disk[name] / samples,
            "fill_samples_per_s": summary(samples / t),
            "speed_vs_logits_only": summary(logits_t / t),  # paired per repeat
        }
    return out


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    result = run(samples=int(sys.argv[2]) if len(sys.argv) > 2 else 2000)
    path = ROOT / "experiments" / "results" / "features_fill_cpu.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
