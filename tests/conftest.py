"""Shared fixtures: the CIFAR-10 data folder and a set-up CIFAR-10 DataModule.

Weights & Biases is forced offline for the whole session (set here at import, before any test imports wandb), so
no test ever reaches the network; its files go to a temporary folder unless a test names another ``save_dir``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# W&B: never online in tests ("disabled" is also network-free and left alone), quiet, writing to a temp folder.
if os.environ.get("WANDB_MODE") != "disabled":
    os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
if "WANDB_DIR" not in os.environ:
    _wandb_dir = tempfile.mkdtemp(prefix="lkd-tests-wandb-")
    os.environ["WANDB_DIR"] = _wandb_dir
    atexit.register(shutil.rmtree, _wandb_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data folder (``$LKD_DATA_DIR`` or ``../shared/data``); a missing archive fails the test."""
    from lightning_kd.data.cifar import NPZ_NAME, default_data_dir

    path = default_data_dir()
    if not (path / NPZ_NAME).is_file():
        pytest.fail(
            f"shared data not found: {path / NPZ_NAME} does not exist. Put the shared data folder at "
            f"{path} or point LKD_DATA_DIR at the folder holding {NPZ_NAME}.",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def cifar():
    """A set-up CIFAR-10 DataModule with default options (seed 0, val_size 5000, batch 128 / eval 512).

    Reads the offline archive from the default data folder, reusing the decoded arrays cached under
    ``$LKD_CACHE_DIR`` (or ``~/.cache/lightning_kd``); without the archive it uses torchvision's CIFAR-10 (what
    CI does). Neither available -> ``DataNotFoundError`` naming both fixes. Shared by the session: don't mutate.
    """
    from lightning_kd.data.cifar import CIFAR10DataModule

    dm = CIFAR10DataModule()
    dm.setup("fit")
    return dm
