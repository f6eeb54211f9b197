"""CIFAR10DataModule and the batched transforms: batch contract, labels/pixels against the source archive, split
determinism, stable indices, augmentation views, crop + flip against a reference, and the errors for missing or
corrupted data."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_kd.data import transforms as T
from lightning_kd.data.cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    NPZ_NAME,
    NPZ_SHA256,
    CIFAR10DataModule,
    DataNotFoundError,
    default_cache_dir,
    load_cifar10,
)

N_TRAIN = 50_000


@pytest.fixture(scope="module")
def source(cifar, request):
    """``source(split, i) -> (uint8 HWC image, label)`` read independently of the DataModule.

    From the offline archive (one JPEG decoded with PIL) when the DataModule uses it; from torchvision's files
    when it uses that fallback (CI without the shared folder).
    """
    if cifar.fingerprint().startswith("cifar10:torchvision:"):
        from torchvision.datasets import CIFAR10

        root = default_cache_dir() / "torchvision"
        sets = {"train": CIFAR10(root, train=True, download=False), "test": CIFAR10(root, train=False, download=False)}
        return lambda split, i: (np.array(sets[split].data[i]), int(sets[split].targets[i]))

    npz = np.load(request.getfixturevalue("data_dir") / NPZ_NAME)
    arrays = {k: npz[k] for k in ("train_jpeg", "train_offsets", "train_labels",
                                  "test_jpeg", "test_offsets", "test_labels")}
    npz.close()

    def read(split: str, i: int) -> tuple[np.ndarray, int]:
        off = arrays[f"{split}_offsets"]
        with Image.open(io.BytesIO(arrays[f"{split}_jpeg"][off[i] : off[i + 1]].tobytes())) as im:
            return np.array(im.convert("RGB")), int(arrays[f"{split}_labels"][i])

    return read


def _raw(x: torch.Tensor) -> torch.Tensor:
    """A normalize=False float batch in [0, 1] back to exact uint8 values."""
    return (x * 255).round().to(torch.uint8)


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return x * s + m


# -- batch contract -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["train", "val", "test"])
def test_batch_contract(cifar, source, stage):
    loader = {"train": cifar.train_dataloader, "val": cifar.val_dataloader, "test": cifar.test_dataloader}[stage]()
    batch = next(iter(loader))
    assert set(batch) == {"index", "input", "target"}
    b = cifar.batch_size if stage == "train" else cifar.eval_batch_size
    x, y, idx = batch["input"], batch["target"], batch["index"]
    assert x.dtype == torch.float32 and x.shape == (b, 3, 32, 32)
    assert y.dtype == torch.int64 and y.shape == (b,)
    assert idx.dtype == torch.int64 and idx.shape == (b,)
    assert int(y.min()) >= 0 and int(y.max()) < 10
    # inputs are normalized with the CIFAR-10 statistics: roughly zero mean / unit std, not [0, 1]
    assert float(x.min()) < -1.0 and abs(float(x.mean())) < 0.5 and 0.6 < float(x.std()) < 1.4
    # indices come from the right pool, and targets are the source's labels at those indices
    pool = {"train": cifar.train_indices, "val": cifar.val_indices, "test": np.arange(10_000)}[stage]
    assert np.isin(idx.numpy(), pool).all()
    split = "test" if stage == "test" else "train"
    for pos in range(0, b, 37):
        assert int(y[pos]) == source(split, int(idx[pos]))[1]


def test_fingerprint_and_decoded_cache(cifar):
    fp = cifar.fingerprint()
    assert fp.startswith("cifar10:")
    if not fp.startswith("cifar10:torchvision:"):
        assert fp == f"cifar10:{NPZ_SHA256}"
        assert (default_cache_dir() / f"cifar10_jpeg_{NPZ_SHA256[:16]}.npz").is_file()


@pytest.mark.parametrize("split", ["train", "test"])
def test_pixels_and_labels_match_source(cifar, source, split):
    """Eval view, normalize=False: input at index i is exactly the decoded image i (no crop, flip, transposition)."""
    idx = np.array([0, 1, 999, 4_999, 5_000, 12_345, 27_182, 49_999] if split == "train"
                   else [0, 1, 999, 4_999, 5_000, 9_999])
    if split == "train":
        batch = cifar.make_dataset(idx, "eval", normalize=False).__getitems__(list(range(len(idx))))
    else:
        test = cifar.test_dataset()  # served in a fixed shuffled order: find the positions of these indices
        batch = test.__getitems__(torch.argsort(test.indices)[torch.from_numpy(idx)].tolist())
        batch["input"] = _unnormalize(batch["input"])
    assert batch["index"].tolist() == idx.tolist()
    if split == "train":
        assert float(batch["input"].min()) >= 0.0 and float(batch["input"].max()) <= 1.0
    for pos, i in enumerate(idx):
        image, label = source(split, int(i))
        expected = torch.from_numpy(image).permute(2, 0, 1)
        assert torch.equal(_raw(batch["input"][pos]), expected), f"{split} image {i} differs from the source"
        assert int(batch["target"][pos]) == label
    if split == "train":
        assert cifar.targets(idx).tolist() == [source("train", int(i))[1] for i in idx]


# -- split -------------------------------------------------------------------------------------------------------------


def test_split_determinism(cifar):
    same = CIFAR10DataModule(seed=0)
    same.setup()
    other = CIFAR10DataModule(seed=1, val_size=1000)
    other.setup()
    assert np.array_equal(same.val_indices, cifar.val_indices)
    assert np.array_equal(same.train_indices, cifar.train_indices)
    for dm, n_val in ((cifar, 5000), (other, 1000)):
        assert len(dm.val_indices) == n_val and len(dm.train_indices) == N_TRAIN - n_val
        assert len(np.intersect1d(dm.val_indices, dm.train_indices)) == 0
        assert np.array_equal(np.union1d(dm.val_indices, dm.train_indices), np.arange(N_TRAIN))
    # the archive is ordered by class: a real shuffle gives every class about a tenth of the validation split
    counts = np.bincount(cifar.targets(cifar.val_indices), minlength=10)
    assert counts.min() > 400 and counts.max() < 600, counts


def test_split_seed_changes_split(cifar):
    b = CIFAR10DataModule(seed=1)
    b.setup()
    assert len(np.intersect1d(cifar.val_indices, b.val_indices)) < 1000  # ~500 expected by chance, 5000 if equal
    with pytest.raises(ValueError, match="val_size"):
        CIFAR10DataModule(val_size=N_TRAIN).setup()


# -- stable indices ----------------------------------------------------------------------------------------------------


def test_index_stability(cifar):
    """The sample with index i is the same image whatever the split seed, subset or position in it."""
    target = np.array([3, 777, 20_000, 45_123])
    alone = cifar.make_dataset(target, "eval", normalize=False).__getitems__([0, 1, 2, 3])
    other = CIFAR10DataModule(seed=7, val_size=100)
    other.setup()
    mixed = np.array([45_123, 11, 3, 30_001, 20_000, 777])
    reordered = other.make_dataset(mixed, "eval", normalize=False).__getitems__([0, 2, 4, 5])
    order = [3, 0, 2, 1]  # positions of 45123, 3, 20000, 777 in `target`
    for key in ("index", "input", "target"):
        assert torch.equal(reordered[key], alone[key][order]), key
    single = cifar.make_dataset(np.array([777]), "eval", normalize=False)[0]
    assert int(single["index"]) == 777 and torch.equal(single["input"], alone["input"][1])
    # a batch from the loader: its inputs are those of its indices fetched on their own
    batch = next(iter(cifar.val_dataloader()))
    again = cifar.make_dataset(batch["index"].numpy()[::-1].copy(), "eval").__getitems__(
        list(range(len(batch["index"])))
    )
    assert torch.equal(again["input"].flip(0), batch["input"])
    # distinct indices are distinct images (rules out every index mapping to the same row)
    assert not torch.equal(alone["input"][0], alone["input"][1])


# -- augmentation views ------------------------------------------------------------------------------------------------


def _is_crop_flip_of(view: torch.Tensor, image: torch.Tensor, padding: int = 4) -> bool:
    """Whether ``view`` is one of the (2p+1)^2 * 2 crop + flip views of ``image`` (uint8 CHW)."""
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            for flip in (False, True):
                if torch.equal(_reference_crop_flip(image[None], padding, [dy], [dx], [flip])[0], view):
                    return True
    return False


def test_train_view_is_fresh_random_crop_flip(cifar):
    idx = np.arange(0, N_TRAIN, 797)[:64]
    ds = cifar.make_dataset(idx, "train", normalize=False)
    pos = list(range(len(idx)))
    a, b = ds.__getitems__(pos), ds.__getitems__(pos)
    same = [torch.equal(a["input"][i], b["input"][i]) for i in pos]
    assert sum(same) < len(pos) // 4, "the train view must draw a new crop + flip on every fetch"
    assert torch.equal(a["target"], b["target"]) and torch.equal(a["index"], b["index"])
    clean = cifar.make_dataset(idx, "eval", normalize=False).__getitems__(pos)
    for i in range(8):
        assert _is_crop_flip_of(_raw(a["input"][i]), _raw(clean["input"][i])), f"train view {i} is not a crop + flip"
    # the training loader uses that view
    batch = next(iter(cifar.train_dataloader()))
    clean = cifar.make_dataset(batch["index"].numpy(), "eval").__getitems__(list(range(len(batch["index"]))))
    differs = sum(not torch.equal(batch["input"][i], clean["input"][i]) for i in range(len(batch["index"])))
    assert differs > len(batch["index"]) // 2


def test_fixed_view_is_a_function_of_seed_and_index(cifar):
    idx = np.arange(5, N_TRAIN, 1013)[:40]
    pos = list(range(len(idx)))
    a = cifar.make_dataset(idx, "fixed", normalize=False, seed=3)
    b = cifar.make_dataset(idx, "fixed", normalize=False, seed=3)
    first, again, twin = a.__getitems__(pos), a.__getitems__(pos), b.__getitems__(pos)
    assert torch.equal(first["input"], again["input"])
    assert torch.equal(first["input"], twin["input"])
    # independent of the batch it is fetched in (position, neighbours)
    sub = a.__getitems__([7, 2])
    assert torch.equal(sub["input"], first["input"][[7, 2]])
    shifted = cifar.make_dataset(np.concatenate([[1, 2, 3], idx]), "fixed", normalize=False, seed=3)
    assert torch.equal(shifted.__getitems__([p + 3 for p in pos])["input"], first["input"])
    # another seed: another view for most samples
    c = cifar.make_dataset(idx, "fixed", normalize=False, seed=4).__getitems__(pos)
    assert sum(not torch.equal(c["input"][i], first["input"][i]) for i in pos) > len(pos) // 2
    # it is augmented (a crop + flip of the clean image, and not the clean image itself for most samples)
    clean = cifar.make_dataset(idx, "eval", normalize=False).__getitems__(pos)
    assert sum(not torch.equal(clean["input"][i], first["input"][i]) for i in pos) > len(pos) // 2
    for i in range(6):
        assert _is_crop_flip_of(_raw(first["input"][i]), _raw(clean["input"][i]))
    # normalization is applied on top of the same view
    normed = cifar.make_dataset(idx, "fixed", normalize=True, seed=3).__getitems__(pos)
    assert torch.allclose(_unnormalize(normed["input"]), first["input"], atol=1e-5)


# -- transforms --------------------------------------------------------------------------------------------------------


def _reference_crop_flip(images, padding, dy, dx, flip):
    """Straightforward numpy reference: zero-pad, slice the (H, W) window at (dy, dx), mirror left-right."""
    arr = images.numpy()
    n, _, h, w = arr.shape
    padded = np.pad(arr, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out = np.empty_like(arr)
    for k in range(n):
        crop = padded[k, :, int(dy[k]) : int(dy[k]) + h, int(dx[k]) : int(dx[k]) + w]
        out[k] = crop[:, :, ::-1] if bool(flip[k]) else crop
    return torch.from_numpy(out)


@pytest.mark.parametrize("padding", [0, 1, 4])
def test_crop_flip_matches_reference(padding):
    g = torch.Generator().manual_seed(padding)
    span = 2 * padding + 1
    # non-square, 3 channels, every (dy, dx) corner and the centre with and without flip
    offsets = [(0, 0), (0, span - 1), (span - 1, 0), (span - 1, span - 1), (padding, padding), (padding // 2, span - 1)]
    combos = [(dy, dx, f) for dy, dx in offsets for f in (False, True)]
    images = torch.randint(0, 256, (len(combos), 3, 7, 10), dtype=torch.uint8, generator=g)
    dy = torch.tensor([c[0] for c in combos])
    dx = torch.tensor([c[1] for c in combos])
    flip = torch.tensor([c[2] for c in combos])
    out = T.crop_flip(images, padding, dy, dx, flip)
    assert out.dtype == torch.uint8 and out.shape == images.shape and out.is_contiguous()
    assert torch.equal(out, _reference_crop_flip(images, padding, dy, dx, flip))
    # the centred, unflipped crop is the identity
    centre = T.crop_flip(images, padding, torch.full((len(combos),), padding), torch.full((len(combos),), padding),
                         torch.zeros(len(combos), dtype=torch.bool))
    assert torch.equal(centre, images)


def test_crop_flip_params():
    span = 9
    idx = torch.arange(20_000)
    dy, dx, flip = T.crop_flip_params(len(idx), 4, index=idx, seed=0)
    again = T.crop_flip_params(len(idx), 4, index=idx, seed=0)
    assert all(torch.equal(u, v) for u, v in zip((dy, dx, flip), again))
    assert flip.dtype == torch.bool
    assert int(dy.min()) == 0 and int(dy.max()) == span - 1 and int(dx.min()) == 0 and int(dx.max()) == span - 1
    # roughly uniform and independent: every (dy, dx) cell and both flips about equally often
    cells = torch.bincount(dy * span + dx, minlength=span * span)
    assert int(cells.min()) > 150 and int(cells.max()) < 350, cells  # 247 expected
    assert 0.45 < float(flip.float().mean()) < 0.55
    assert float((flip == (dy % 2 == 1)).float().mean()) < 0.55  # no coupling between fields
    # per-index: a sample's parameters do not depend on the others fetched with it
    part = T.crop_flip_params(3, 4, index=idx[[17, 4242, 19_999]], seed=0)
    assert all(torch.equal(p, full[[17, 4242, 19_999]]) for p, full in zip(part, (dy, dx, flip)))
    # the seed matters
    other = T.crop_flip_params(len(idx), 4, index=idx, seed=1)
    assert float((other[0] == dy).float().mean()) < 0.3
    # drawn parameters: in range, reproducible with a generator
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    r1, r2 = T.crop_flip_params(1000, 2, generator=g1), T.crop_flip_params(1000, 2, generator=g2)
    assert all(torch.equal(u, v) for u, v in zip(r1, r2))
    assert int(r1[0].min()) == 0 and int(r1[0].max()) == 4 and int(r1[1].max()) == 4


def _splitmix64_reference(x: int) -> int:
    """SplitMix64 (Steele et al.) on Python ints modulo 2^64."""
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_fixed_params_follow_splitmix64():
    """The fixed view is SplitMix64(index * 1_000_003 + seed) (int64 wrap-around handled right), so cached teacher
    outputs stay valid across versions and machines."""
    assert _splitmix64_reference(0) == 0xE220A8397B1DCDAF  # published first output for state 0
    idx = torch.tensor([0, 1, 2, 49_999, 123_456_789, 2**40 + 3])
    for seed in (0, 1, 12345):
        dy, dx, flip = T.crop_flip_params(len(idx), 4, index=idx, seed=seed)
        for k, i in enumerate(idx.tolist()):
            h = _splitmix64_reference(i * 1_000_003 + seed) & 0x7FFFFFFFFFFFFFFF
            assert (int(dy[k]), int(dx[k]), bool(flip[k])) == (h % 9, (h // 9) % 9, bool((h // 81) % 2)), (seed, i)


# -- errors ------------------------------------------------------------------------------------------------------------


def test_missing_data_raises_data_not_found(tmp_path):
    data_dir, cache_dir = tmp_path / "no_data", tmp_path / "no_cache"
    data_dir.mkdir()
    dm = CIFAR10DataModule(data_dir=str(data_dir), cache_dir=str(cache_dir), download=False)
    with pytest.raises(DataNotFoundError) as info:
        dm.setup()
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(data_dir / NPZ_NAME) in msg  # names the folder it looked in
    assert str(cache_dir / "torchvision") in msg
    assert "LKD_DATA_DIR" in msg and "download=True" in msg  # both fixes
    with pytest.raises(DataNotFoundError):
        dm.prepare_data()
    assert not any(cache_dir.glob("**/*.tar.gz")), "download=False must not download"


def test_wrong_sha256_is_a_clear_error(tmp_path):
    fake = tmp_path / NPZ_NAME
    np.savez(fake, train_labels=np.zeros(3, dtype=np.uint8))
    cache_dir = tmp_path / "cache"
    with pytest.raises(ValueError, match="sha256") as info:
        load_cifar10(tmp_path, cache_dir, download=False)
    assert str(fake) in str(info.value) and NPZ_SHA256 in str(info.value)
    assert not cache_dir.exists() or not any(cache_dir.iterdir()), "a corrupted archive must not be decoded or cached"
    with pytest.raises(ValueError, match="sha256"):
        CIFAR10DataModule(data_dir=str(tmp_path), cache_dir=str(cache_dir), download=False).setup()
