"""DatasetDataModule: an ImageFolder in a temporary directory under the budgeted teacher-output cache."""

import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from lightning_kd.cache import CacheMismatchError, TeacherBudget
from lightning_kd.data import CachedTeacherDataModule, CIFAR10DataModule, DatasetDataModule, SampleLoadError
from lightning_kd.data.plan import purchase_order
from lightning_kd.data.views import image_transform

sys.path.insert(0, str(Path(__file__).parents[1]))
from teachers_for_tests import CountingTeacher, teacher_function  # noqa: E402

CLASSES, PER_CLASS, SIZE, STUDENT, TEACHER = 10, 24, 16, 24, 32


def write_folder(root: Path, classes: int = CLASSES, per_class: int = PER_CLASS, seed: int = 0) -> Path:
    """``classes`` sub-folders of random ``SIZE``-px images, alternately PNG and JPEG."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(
                root / f"class_{c}" / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(autouse=True)
def listings_in_tmp(tmp_path, monkeypatch):
    """Folder fingerprints keep their file listings under $LKD_CACHE_DIR: a temporary one here."""
    monkeypatch.setenv("LKD_CACHE_DIR", str(tmp_path / "lkd"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("images"))


def teacher_view() -> v2.Compose:
    """A random teacher pipeline at its own resolution, drawing from torch's and Python's RNGs (timm-style)."""
    from timm.data.transforms import RandomResizedCropAndInterpolation  # draws from Python's `random`

    return v2.Compose([RandomResizedCropAndInterpolation(TEACHER, scale=(0.5, 1.0)), v2.RandomHorizontalFlip(),
                       v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def data(root: Path, **kw) -> DatasetDataModule:
    kw.setdefault("teacher_transform", teacher_view())
    return DatasetDataModule(ImageFolder(root), train_transform=image_transform(STUDENT, train=True),
                             eval_transform=image_transform(STUDENT), batch_size=16, **kw)


def cached(dm, teacher, cache_dir, budget, **kw) -> CachedTeacherDataModule:
    kw.setdefault("fill_batch_size", 32)
    return CachedTeacherDataModule(dm, teacher, budget=budget, cache_dir=str(cache_dir), progress=False, **kw)


class ShapeTeacher(CountingTeacher):
    """A counting teacher that records the input shapes it is run on."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.shapes: set[tuple[int, ...]] = set()

    def __call__(self, x):
        self.shapes.add(tuple(x.shape[1:]))
        return super().__call__(x)


@pytest.mark.parametrize("workers", [0, 2])
def test_fill_costs_exactly_the_budget_then_nothing_at_each_ones_resolution(folder, tmp_path, workers):
    teacher = ShapeTeacher()
    dm = cached(data(folder, num_workers=workers), teacher, tmp_path, budget=100)
    dm.fill()
    assert teacher.calls == dm.new_teacher_calls == dm.budget_state.used == len(dm.train_indices) == 100
    assert teacher.shapes == {(3, TEACHER, TEACHER)}

    again_teacher = CountingTeacher()
    again = cached(data(folder, num_workers=workers), again_teacher, tmp_path, budget=100)
    again.fill()
    assert again_teacher.calls == 0 and np.array_equal(again.train_indices, dm.train_indices)
    batch = next(iter(again.train_dataloader()))
    assert batch["input"].shape == (16, 3, STUDENT, STUDENT) and batch["teacher_logits"].shape == (16, CLASSES)
    assert torch.equal(batch["target"], torch.from_numpy(again.targets(batch["index"].numpy())))
    assert next(iter(again.val_dataloader()))["input"].shape[1:] == (3, STUDENT, STUDENT)
    assert again_teacher.calls == 0


def test_the_teachers_fixed_view_is_reproducible_from_seed_and_index(folder, tmp_path):
    first = cached(data(folder), CountingTeacher(), tmp_path / "a", budget=64)
    first.fill()
    # Another process, order of purchase and worker count: the same view of every sample, the same outputs.
    second = cached(data(folder, num_workers=2), CountingTeacher(), tmp_path / "b", budget=64)
    second.fill()
    idx = first.train_indices
    assert torch.equal(first.cache.get(idx), second.cache.get(idx))
    views = first.datamodule.teacher_dataset(idx[::-1].copy(), "fixed", seed=0)
    assert torch.equal(teacher_function(views.__getitems__(list(range(len(idx))))["input"]).flip(0),
                       first.cache.get(idx))
    other_seed = first.datamodule.teacher_dataset(idx, "fixed", seed=1).__getitems__([0, 1, 2])["input"]
    assert not torch.equal(other_seed, first.datamodule.teacher_dataset(idx, "fixed").__getitems__([0, 1, 2])["input"])

    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    views.__getitems__([0, 1, 2])
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state)


class NumpyJitter:
    """A pipeline step drawing from NumPy's global RNG (some pipelines do)."""

    def __call__(self, x):
        return x + float(np.random.uniform(-0.1, 0.1))

    def __repr__(self) -> str:
        return "NumpyJitter()"


@pytest.mark.parametrize("seed", [0, 3, 2**40])  # 2**40: past the range of the batch's vectorized seeds
def test_a_samples_fixed_view_does_not_depend_on_its_batch(folder, seed):
    dm = data(folder, teacher_transform=v2.Compose([teacher_view(), NumpyJitter()]))
    idx = np.arange(0, 40, 3)
    views = dm.teacher_dataset(idx, "fixed", seed=seed)
    whole = views.__getitems__(list(range(len(idx))))["input"]
    for p in (0, 5, len(idx) - 1):
        assert torch.equal(views[p]["input"], whole[p])  # alone (its own RNG save and restore)
        assert torch.equal(views.__getitems__([p, 0])["input"][0], whole[p])  # in another batch, another position
    assert not torch.equal(whole[0], whole[1])


def test_the_batch_seeds_are_numpys_seed_sequence():
    from lightning_kd.data import samples

    idx = np.concatenate([[0, 1, 2**31, 2**32 - 1, 2**32, 2**40], np.random.default_rng(0).integers(0, 2**32, 300)])
    assert samples._VECTORIZED_OK  # the vectorized pass reproduces this NumPy's SeedSequence (else batches fall back)
    for seed in (0, 1, 12345, 2**32 - 1, 2**32):
        want = [int(np.random.SeedSequence([seed, int(i)]).generate_state(1, np.uint64)[0]) for i in idx]
        assert samples.sample_seeds(seed, idx) == want == [samples.sample_seed(seed, int(i)) for i in idx]
        if seed < 2**32:  # seed and indices in [0, 2**32): the vectorized pass itself
            assert samples._sample_seeds_vectorized(seed, idx[idx < 2**32]).tolist() == [
                w for w, i in zip(want, idx) if i < 2**32]


def test_the_student_view_is_fresh_at_every_fetch(folder):
    ds = data(folder).make_dataset(np.arange(8), "train")
    assert not torch.equal(ds.__getitems__(list(range(8)))["input"], ds.__getitems__(list(range(8)))["input"])


def test_a_cache_made_with_another_teacher_view_is_refused(folder, tmp_path):
    cached(data(folder), CountingTeacher(), tmp_path, budget=8).fill()
    other = cached(data(folder, teacher_transform=image_transform(TEACHER)), CountingTeacher(), tmp_path, budget=8)
    with pytest.raises(CacheMismatchError, match="view"):
        other.fill()


def test_cifar_keeps_its_view_identity():
    cifar = CIFAR10DataModule()
    assert cached(cifar, None, "unused", budget=8).view_protocol == "augmented(seed=0,pad=4,raw)"
    assert cached(cifar, None, "unused", budget=8, view="clean", seed=3).view_protocol == "clean(raw)"


def test_a_timm_name_takes_timms_data_config_for_the_teacher(folder):
    dm = data(folder, teacher_transform="resnet18")
    x = dm.teacher_dataset(np.arange(2), "eval").__getitems__([0, 1])["input"]
    assert x.shape == (2, 3, 224, 224) and x.min() < 0  # resized to timm's 224 and normalized with its mean/std
    assert "CenterCrop(size=(224, 224))" in dm.view_fingerprint("eval")


def test_targets_come_without_decoding_else_with_a_warning(folder):
    dm = data(folder)
    assert np.array_equal(dm.targets(np.array([0, PER_CLASS, 3 * PER_CLASS])), [0, 1, 3])

    class NoTargets(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(3, 4, 4), i % 2

    with pytest.warns(UserWarning, match="decoding every image"):
        assert DatasetDataModule(NoTargets()).num_classes == 2


def test_items_that_are_not_image_target_pairs_are_refused(folder):
    class Dicts(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"image": torch.zeros(3, 4, 4), "label": 0}

    ds = DatasetDataModule(Dicts(), num_classes=2, fingerprint="dicts").make_dataset(np.arange(2), "eval")
    with pytest.raises(TypeError, match=r"sample 0 of Dicts is a dict with keys \['image', 'label'\].*\(image, targ"):
        ds.__getitems__([0])


def test_a_target_outside_num_classes_is_refused_naming_the_file(folder):
    with pytest.raises(ValueError, match=r"sample 216 \(.*class_9.*\) and 23 more: target 9 is outside the 9 classes"):
        data(folder, num_classes=9).setup()


def test_teacher_outputs_with_another_class_count_are_refused_naming_both(folder, tmp_path):
    dm = cached(data(folder, num_classes=12), CountingTeacher(), tmp_path, budget=8)
    with pytest.raises(ValueError, match="10 classes, but the dataset has 12"):
        dm.fill()


def test_a_folder_changed_on_disk_is_refused_naming_the_change(tmp_path):
    root = write_folder(tmp_path / "images", classes=3, per_class=6)
    cached(data(root, num_classes=10), CountingTeacher(), tmp_path / "cache", budget=6).fill()
    shutil.copy(root / "class_0" / "000.jpg", root / "class_1" / "new.jpg")
    (root / "class_2" / "001.png").unlink()
    again = cached(data(root, num_classes=10), CountingTeacher(), tmp_path / "cache", budget=6)
    with pytest.raises(CacheMismatchError, match=r"1 file\(s\) added \(class_1/new.jpg\); 1 removed \(class_2/001.png\)"
                       r".*another cache_dir"):
        again.fill()


@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_that_fails_to_decode_is_named_and_the_fill_keeps_what_it_bought(tmp_path, workers):
    root = write_folder(tmp_path / "images", classes=3, per_class=10)

    def fill(teacher):
        dm = cached(data(root, num_workers=workers, num_classes=10), teacher, tmp_path / "cache", budget=30,
                    fill_batch_size=4)
        dm.setup()
        return dm

    dm = fill(CountingTeacher())
    sample = int(purchase_order(dm.selected, dm.h.seed, 0, 1)[21])  # in the 6th batch of 4 bought
    path = Path(ImageFolder(root).samples[sample][0])
    path.write_bytes(b"not an image")
    for _ in range(2):  # the rerun buys nothing new before stopping at the same file
        teacher = CountingTeacher()
        with pytest.raises(SampleLoadError, match=f"{path.parent.name}/{path.name}"):
            fill(teacher).fill()
        summary = TeacherBudget(30, tmp_path / "cache").summary()
        assert summary.committed == summary.used == 20 and summary.lost == 0  # the failing batch was never sent
    assert teacher.calls == 0


@pytest.mark.ddp
def test_two_ddp_ranks_fill_an_image_folder_once_and_see_the_same_cache(folder, tmp_path):
    import json

    from teachers_for_tests import logged_samples, run_helper

    log = tmp_path / "paid.log"
    proc = run_helper("ddp_folder", tmp_path, tmp_path / "cache", folder, 100, log, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["calls"] > 0 and r1["calls"] > 0 and r0["calls"] + r1["calls"] == 100  # disjoint shards
    assert len(logged_samples(log)) == 100 == r0["new_calls"] == r1["new_calls"]
    assert r0["cached"] == r1["cached"] == r0["train"] == 100 and r0["values_sha"] == r1["values_sha"]


def test_a_hugging_face_dataset_is_read_by_its_columns():
    datasets = pytest.importorskip("datasets", reason="the optional extra lightning_kd[hf] is not installed")
    images = [Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)) for i in range(6)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    hf = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 0, 1, 2]}, features=features)
    dm = DatasetDataModule(hf)
    assert dm.num_classes == 3 and dm.fingerprint().startswith("hf:")
    batch = dm.make_dataset(np.arange(6), "eval").__getitems__([1, 5])
    assert batch["input"].shape == (2, 3, 8, 8) and batch["target"].tolist() == [1, 2]
