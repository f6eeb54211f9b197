"""Several teacher views per sample: the budget counts (sample, view) calls; matched views are the teacher's pixels."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_kd.data.cifar import CIFAR10_MEAN, CIFAR10_STD
from lightning_kd.data.multiview import KeyedViews, view_keys, view_seed

sys.path.insert(0, str(Path(__file__).parents[1]))
from teachers_for_tests import CountingTeacher, logged_samples, make_datamodule, teacher_function  # noqa: E402

STRIDE = 50_000  # CIFAR-10's training rows


def test_budget_400_with_two_views_buys_200_samples_twice(tmp_path):
    log = tmp_path / "paid.log"
    dm = make_datamodule(CountingTeacher(log=str(log)), tmp_path / "cache", 400, views_per_sample=2)
    dm.fill()
    assert len(dm.selected) == 200 and dm.new_teacher_calls == 400
    paid = logged_samples(log)
    # 400 calls, each a distinct (sample, view) key; two random pad-4 crops + flips of one image coincide with
    # probability 1/162, so a few pairs of views may be pixel-identical (seed 0: 3 of 200)
    assert len(paid) == 400 and len(set(paid)) >= 390
    assert np.array_equal(dm.cache.indices, view_keys(dm.selected, 2, STRIDE))
    assert np.array_equal(dm.train_indices, dm.selected) and len(dm.train_keys) == 400
    # view 0 is the single-view run's fixed view: its outputs are shared, a single-view run costs nothing more
    single = make_datamodule(CountingTeacher(), tmp_path / "cache", 400, views_per_sample=1)
    single.setup("fit")
    single.selected = dm.selected  # the same samples (a budget of 200 single views would choose others)
    assert single.cache is None and dm.cache.contains(single.wanted).all()


def test_view_v_of_sample_i_is_reproducible_and_view_0_is_the_fixed_view(cifar):
    idx = np.array([3, 17, 4242])
    fixed = cifar.teacher_dataset(idx, "fixed", seed=5).__getitems__([0, 1, 2])["input"]
    keys = view_keys(idx, 3, STRIDE)
    a = KeyedViews(keys, STRIDE, lambda i, s: cifar.teacher_dataset(i, "fixed", seed=s), seed=5)
    b = KeyedViews(keys[::-1].copy(), STRIDE, lambda i, s: cifar.teacher_dataset(i, "fixed", seed=s), seed=5)
    xa = a.__getitems__(list(range(9)))
    xb = b.__getitems__(list(range(9))[::-1])
    assert torch.equal(xa["input"], xb["input"]) and torch.equal(xa["index"], torch.from_numpy(keys))
    assert torch.equal(xa["input"][:3], fixed)  # keys are sorted: view 0 first
    assert not torch.equal(xa["input"][3:6], fixed)  # view 1 is another crop / flip
    assert view_seed(5, 0) == 5 and view_seed(5, 1) != view_seed(5, 2)


def test_matched_views_hand_the_student_the_teachers_exact_pixels(tmp_path):
    dm = make_datamodule(CountingTeacher(), tmp_path / "cache", 64, views_per_sample=2, matched_views=True)
    dm.fill()
    ds = dm.train_dataset()
    batch = ds.__getitems__(list(range(len(ds))))
    keys = batch["index"].numpy()
    teacher_view = KeyedViews(keys, STRIDE, seed=0, make=lambda i, s: dm.datamodule.teacher_dataset(i, "fixed", seed=s))
    pixels = teacher_view.__getitems__(list(range(len(keys))))["input"]  # what the teacher was run on, in [0, 1]
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.allclose(batch["input"] * std + mean, pixels, atol=1e-6)
    assert torch.allclose(batch["teacher_logits"], teacher_function(pixels), atol=1e-5)
    again = ds.__getitems__(list(range(len(ds))))
    assert torch.equal(again["input"], batch["input"])  # matched: the same pixels every epoch


def test_fresh_views_augment_again_but_keep_each_views_outputs(tmp_path):
    dm = make_datamodule(CountingTeacher(), tmp_path / "cache", 64, views_per_sample=2)
    dm.fill()
    ds = dm.train_dataset()
    a, b = ds.__getitems__(list(range(64))), ds.__getitems__(list(range(64)))
    assert not torch.equal(a["input"], b["input"])  # a fresh crop / flip at every fetch
    assert torch.equal(a["teacher_logits"], dm.cache.get(a["index"]))
    assert set(np.unique(a["index"].numpy() // STRIDE)) == {0, 1}


def test_views_train_the_same_number_of_steps_as_one_view(tmp_path):
    one = make_datamodule(CountingTeacher(), tmp_path / "a", 128)
    two = make_datamodule(CountingTeacher(), tmp_path / "b", 128, views_per_sample=2)
    assert len(one.train_dataloader()) == len(two.train_dataloader()) == 4


@pytest.mark.parametrize(
    "kw, message",
    [(dict(views_per_sample=0), "views_per_sample must be an integer >= 1"),
     (dict(views_per_sample=65), "larger than the budget 64"),
     (dict(views_per_sample=2, rounds=2), "needs rounds=1"),
     (dict(matched_views=True, view="clean"), "needs view='augmented'")],
)
def test_bad_view_settings_are_refused(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        make_datamodule(CountingTeacher(), tmp_path, 64, **kw)
