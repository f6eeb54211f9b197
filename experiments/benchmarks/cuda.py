"""Section 6 (``--device cuda``): section 1 with bf16 autocast + channels_last for two model pairs."""

from __future__ import annotations

import argparse

from benchmarks.common import resolve_teacher
from benchmarks.steps import StepConfig, bench_steps


def bench_cuda_pairs(args: argparse.Namespace, device) -> dict:
    """Section 6: section 1 with bf16 autocast + channels_last for a CIFAR and an ImageNet pair."""
    import torch

    out = {}
    pairs = [("resnet32x4", "resnet8x4", 10, 32, args.batch_size),
             ("resnet50", "resnet18", 1000, 224, args.imagenet_batch_size)]
    for teacher_name, student, classes, size, batch in pairs:
        teacher, _ = resolve_teacher(teacher_name, classes)
        teacher.to(device).to(memory_format=torch.channels_last)
        cfg = StepConfig(student, teacher, classes, size, batch, device, bf16=True, channels_last=True,
                         gpd_ratio=args.gpd_ratio)
        print(f"[cuda pair] {teacher_name} -> {student}, {size}x{size}, batch {batch}", flush=True)
        res = bench_steps(cfg, args.warmup, args.repeats)
        out[f"{teacher_name}->{student}"] = {"image_size": size, "batch_size": batch, **res}
        del teacher
        torch.cuda.empty_cache()
    return out
