"""``lkd`` end to end, in process, on a tiny slice of CIFAR-10: fit + test with the default W&B offline logger and
with a CSV logger chosen on the command line; and the shipped experiment configs parse to their recipes."""

from __future__ import annotations

import csv
import json
import struct
import sys
import time
from pathlib import Path

import pytest
import yaml

from lightning_kd.cli import main

ROOT = Path(__file__).resolve().parents[1]
SUPERVISED = ROOT / "experiments" / "cifar10" / "supervised.yaml"
TEACHER = ROOT / "experiments" / "cifar10" / "teacher.yaml"
METRICS = ("train/loss", "train/acc", "val/acc", "val/loss", "test/acc", "test/loss")


def _tiny(tmp_path: Path) -> list[str]:
    return [
        "fit", "--config", str(SUPERVISED),
        # not "1": on the command line it parses as the float 1.0, i.e. every batch (10,000 test images)
        "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2",
        "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
        "--data.init_args.eval_batch_size", "128",
    ]  # fmt: skip


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when both ``args`` and ``sys.argv`` (here pytest's) are present."""
    monkeypatch.setattr(sys, "argv", ["lkd"])


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a W&B run file (``run-<id>.wandb``).

    wandb-core (0.18+) writes an offline run's history and summary only into this file (no
    ``files/wandb-summary.json`` until ``wandb sync``). Format: a 7-byte header (``:W&B``, magic, version), then a
    LevelDB-style log: 32 KiB blocks of chunks ``crc32 (4) | length (2, LE) | type (1) | data``, types FULL=1,
    FIRST=2, MIDDLE=3, LAST=4; each reassembled chunk sequence is one ``wandb.proto.wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a chunk header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_wandb_records(path: Path, timeout: float = 60.0) -> list:
    """The records of a finished run: wandb-core may still be writing the file when ``wandb.finish()`` returns, so
    wait (up to ``timeout`` s) for the ``exit`` record."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def _items(items) -> dict:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def test_fit_with_wandb_offline(tmp_path):
    import wandb

    try:
        main([*_tiny(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    finally:
        wandb.finish()  # lkd leaves the run open for the process's exit; finish it so the run file is complete
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under {tmp_path / 'wandb'}, found {runs}"
    run_files = list(runs[0].glob("run-*.wandb"))
    assert len(run_files) == 1
    records = finished_wandb_records(run_files[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds[0] == "header" and "run" in kinds
    assert "exit" in kinds, "the run was not finished"
    history = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    logged = set().union(*history) if history else set()
    assert set(METRICS) <= logged, f"missing metrics {set(METRICS) - logged} in the W&B history"
    summary: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(_items(r.summary.update))
    for key in METRICS:
        assert 0.0 <= summary[key] <= (1.0 if key.endswith("acc") else 100.0), (key, summary[key])
    config = [_items(r.config.update) for r in records if r.WhichOneof("record_type") == "config"]
    assert any(c.get("student") == "resnet8" for c in config), "hyperparameters not logged"
    # checkpoints (best val/acc + last) and the resolved config land under default_root_dir
    assert list(tmp_path.glob("lightning_kd/*/checkpoints/last.ckpt"))
    assert list(tmp_path.glob("lightning_kd/*/checkpoints/epoch=0-step=3.ckpt"))
    assert (tmp_path / "config.yaml").is_file()


def test_fit_with_csv_logger(tmp_path):
    main(
        [
            *_tiny(tmp_path),
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path),
        ]
    )  # fmt: skip
    files = list(tmp_path.glob("**/metrics.csv"))
    assert len(files) == 1, files
    with open(files[0], newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert set(METRICS) | {"epoch", "step"} <= columns, columns
    for key in ("val/acc", "test/acc"):
        values = [float(r[key]) for r in rows if r[key] != ""]
        assert len(values) == 1 and 0.0 <= values[0] <= 1.0, (key, values)
    assert not (tmp_path / "wandb").exists(), "the CSV logger replaced W&B: no W&B run expected"
    assert (files[0].parent / "config.yaml").is_file() and (files[0].parent / "checkpoints" / "last.ckpt").is_file()


def _print_config(config: Path, capsys) -> dict:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config), "--print_config"])
    assert info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_teacher_config_is_the_shared_teacher_recipe(capsys):
    """experiments/cifar10/teacher.yaml: the recipe of ../shared/data/cifar10_resnet20_teacher.json."""
    cfg = _print_config(TEACHER, capsys)
    assert cfg["seed_everything"] == 0
    model = cfg["model"]
    assert model["class_path"] == "lightning_kd.modules.Supervised"
    m = model["init_args"]
    assert (m["student"], m["num_classes"]) == ("resnet20", 10)
    assert (m["optimizer"], m["nesterov"], m["scheduler"]) == ("sgd", True, "onecycle")
    assert m["lr"] == pytest.approx(0.2) and m["weight_decay"] == pytest.approx(5e-4)
    assert m["label_smoothing"] == pytest.approx(0.1) and m["momentum"] == pytest.approx(0.9)
    d = cfg["data"]["init_args"]
    assert cfg["data"]["class_path"] == "lightning_kd.data.CIFAR10DataModule"
    assert (d["batch_size"], d["val_size"], d["seed"]) == (128, 5000, 0)
    assert cfg["trainer"]["max_epochs"] == 30
    assert cfg["checkpoint"]["monitor"] == "val/acc" and cfg["checkpoint"]["mode"] == "max"


def test_supervised_config_parses(capsys):
    cfg = _print_config(SUPERVISED, capsys)
    assert cfg["model"]["init_args"]["student"] == "resnet8"
    assert cfg["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    assert cfg["trainer"]["logger"]["init_args"]["offline"] is True
