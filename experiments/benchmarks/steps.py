"""Section 1: the cost of one optimizer step of each method, interleaved and paired per repeat."""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from benchmarks.common import summary, time_interleaved


# --------------------------------------------------------------------------------------------------------------
# 1. step cost
# --------------------------------------------------------------------------------------------------------------
@dataclass
class StepConfig:
    student: str
    teacher: object
    num_classes: int
    image_size: int
    batch_size: int
    device: object
    bf16: bool = False
    channels_last: bool = False
    gpd_ratio: float = 2.0


def plain_wide_model(dt):
    """The dynamic teacher's architecture as ordinary layers of the wide shapes (CBR branches merged)."""
    import torch
    from torch import nn

    from lightning_kd.reparam import WideBatchNorm2d, WideConv2d, WideLinear

    def plain(layer):
        if isinstance(layer, WideConv2d):
            new = nn.Conv2d(
                layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                layer.dilation, layer.groups, bias=layer.bias is not None, padding_mode=layer.padding_mode,
            )
            new.weight.copy_(layer.kernel())
        elif isinstance(layer, WideLinear):
            new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            new.weight.copy_(layer.weight)
        elif isinstance(layer, WideBatchNorm2d):
            new = nn.BatchNorm2d(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
            if layer.weight is not None:
                new.weight.copy_(layer.weight)
                new.bias.copy_(layer.bias)
            return nn.Sequential(new, copy.deepcopy(layer.drop), copy.deepcopy(layer.act)) if layer.has_act else new
        else:
            raise TypeError(f"unexpected wide layer {type(layer).__name__}")
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
        return new

    model = copy.deepcopy(dt.model)
    with torch.no_grad():
        for path, layer in list(dt.wide_layers()):
            model.set_submodule(path, plain(layer))
    return model


def _ready(module, cfg: StepConfig):
    """Train mode on the device (channels_last if asked), with ``self.log`` a no-op (there is no Trainer)."""
    import torch

    module.log = lambda *args, **kwargs: None
    module.train().to(cfg.device)
    if cfg.channels_last:
        module.to(memory_format=torch.channels_last)
    return module


def _optimizer_step(module, make_batch: Callable[[], dict], autocast) -> Callable[[], None]:
    """One full optimizer step of ``module.training_step``, with the SGD ``configure_optimizers`` would build."""
    import torch

    h = module.hparams
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=h.lr, momentum=h.momentum, nesterov=h.nesterov, weight_decay=h.weight_decay)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = module.training_step(make_batch(), 0)
        loss.backward()
        opt.step()

    return step


def make_batches(cfg: StepConfig) -> dict[str, dict]:
    """One batch of B images in the layouts each variant takes: plain, with cached logits, (B/2, 2, ...) pairs."""
    import torch

    if cfg.batch_size % 2:
        raise ValueError(f"--batch-size must be even (CKD pairs B/2 tuples of 2), got {cfg.batch_size}")
    g = torch.Generator().manual_seed(0)
    b, s = cfg.batch_size, cfg.image_size
    x = torch.randn(b, 3, s, s, generator=g).to(cfg.device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, cfg.num_classes, (b,), generator=g).to(cfg.device)
    with torch.no_grad():
        z_t = cfg.teacher(x).float().clone()
    if z_t.shape != (b, cfg.num_classes):
        raise ValueError(f"teacher gives {tuple(z_t.shape)} outputs, the student {cfg.num_classes} classes")
    plain = {"index": torch.arange(b, device=cfg.device), "input": x, "target": y}
    cached = {**plain, "teacher_logits": z_t}
    pairs = {k: v.view(b // 2, 2, *v.shape[1:]) for k, v in cached.items()}  # a view: channels_last survives
    return {"plain": plain, "cached": cached, "pairs": pairs}


def step_variants(cfg: StepConfig) -> dict[str, Callable[[], None]]:
    """The optimizer steps compared in section 1, keyed by variant name."""
    import torch

    from lightning_kd.modules import (
        ComparativeDistillation,
        GapPreservingDistillation,
        KnowledgeDistillation,
        Supervised,
    )

    batches = make_batches(cfg)
    autocast = (lambda: torch.autocast(cfg.device.type, dtype=torch.bfloat16)) if cfg.bf16 else nullcontext
    common = {"student": cfg.student, "num_classes": cfg.num_classes}

    def module(cls, **kw):
        torch.manual_seed(0)  # the same student init in every variant
        return _ready(cls(**common, **kw), cfg)

    teacher = cfg.teacher

    def online_batch() -> dict:
        with torch.inference_mode():
            z_t = teacher(batches["plain"]["input"])
        return {**batches["plain"], "teacher_logits": z_t}

    gpd = module(GapPreservingDistillation, ratio=cfg.gpd_ratio, input_size=(3, cfg.image_size, cfg.image_size))
    wide = Supervised(**common)
    wide.student = plain_wide_model(gpd.dynamic_teacher)
    _ready(wide, cfg)
    return {
        "ce": _optimizer_step(module(Supervised), lambda: batches["plain"], autocast),
        "cached_kd": _optimizer_step(module(KnowledgeDistillation), lambda: batches["cached"], autocast),
        "ckd_pairs": _optimizer_step(module(ComparativeDistillation), lambda: batches["pairs"], autocast),
        "online_kd": _optimizer_step(module(KnowledgeDistillation), online_batch, autocast),
        "gpd": _optimizer_step(gpd, lambda: batches["cached"], autocast),
        "wide_ce": _optimizer_step(wide, lambda: batches["plain"], autocast),
    }


def step_ratios(times: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per-repeat (paired) ratios of section 1."""
    t = {k: np.asarray(v) for k, v in times.items()}
    return {
        "cached_kd_step": (t["cached_kd"] / t["ce"]).tolist(),
        "ckd_step_per_image": (t["ckd_pairs"] / t["ce"]).tolist(),  # same B images in both: per image = per step
        "online_kd_step": (t["online_kd"] / t["ce"]).tolist(),
        "gpd_step_vs_parts": (t["gpd"] / (t["wide_ce"] + t["ce"])).tolist(),
    }


def count_ops(fn: Callable[[], None]) -> int:
    """ATen operator calls in one call of ``fn`` (forward, backward and optimizer; views included): a
    device-independent proxy for the kernel launches that bound small models on a GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.calls += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.calls


def bench_steps(cfg: StepConfig, warmup: int, repeats: int) -> dict:
    import torch

    variants = step_variants(cfg)
    sync = torch.cuda.synchronize if cfg.device.type == "cuda" else (lambda: None)
    times = time_interleaved(variants, warmup, repeats, sync)
    ratios = step_ratios(times)
    out = {
        "ratios": {k: summary(v) for k, v in ratios.items()},
        "timings_ms": {k: summary(np.asarray(v) * 1e3) for k, v in times.items()},
    }
    if cfg.device.type == "cpu":  # (on CUDA the backward runs on another thread: count kernels with a profiler)
        ops = {k: count_ops(fn) for k, fn in variants.items()}
        out["ops_per_step"] = ops
        out["ops_ratios"] = {name: float(v[0]) for name, v in step_ratios({k: [n] for k, n in ops.items()}).items()}
    return out
