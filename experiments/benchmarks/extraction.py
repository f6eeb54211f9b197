"""Section 5: extracting the student from a ResNet-18-sized GPD dynamic teacher."""

from __future__ import annotations

import time

from benchmarks.common import summary


# --------------------------------------------------------------------------------------------------------------
# 4. extraction
# --------------------------------------------------------------------------------------------------------------
def bench_extraction(model: str, ratio: float, input_size: int, repeats: int) -> dict:
    import torch

    from lightning_kd.models import create_model
    from lightning_kd.reparam import expand, extract_student

    torch.manual_seed(0)
    net = create_model(model, num_classes=1000)
    t0 = time.perf_counter()
    dt = expand(net, ratio, noise_std=1e-6, branches=True, example_input=torch.randn(2, 3, input_size, input_size))
    expand_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        extract_student(dt)
        times.append(time.perf_counter() - t0)
    return {"model": model, "ratio": ratio, "example_input": input_size, "expand_s": expand_s,
            "extract": summary(times)}
