"""``lkd``: the LightningCLI entry point.

``lkd fit|validate|test|predict --config experiments/cifar10/<run>.yaml`` runs any LightningModule and
DataModule of this package (or yours) chosen in the config; ``fit`` ends with a test of the best-validation
checkpoint (``--test_after_fit false`` skips it). ``lkd cache --config <run>.yaml`` only fills the
teacher-output cache of a :class:`~lightning_kd.data.CachedTeacherDataModule` (a separate job for an expensive
teacher), spending the budget exactly as ``fit`` would. ``lkd cache verify DIR`` reports what a cache holds (exit
status 1 if damaged); ``lkd cache repair DIR [--used-at-least N]`` keeps what is intact
(:mod:`lightning_kd.cache.verify`, :mod:`lightning_kd.cache.repair`).
"""

from __future__ import annotations

import argparse
import sys

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger


class LKDCLI(LightningCLI):
    """LightningCLI with W&B offline logging by default (``wandb sync`` later), runs under ``runs/``, the best
    ``val/acc`` checkpoint kept, and a test after ``fit``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/acc", "checkpoint.mode": "max", "checkpoint.save_last": True})
        parser.add_argument("--test_after_fit", type=bool, default=True, help="test the best checkpoint after fit")
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.WandbLogger",
                    "init_args": {"project": "lightning_kd", "save_dir": "runs", "offline": True},
                },
            }
        )

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit", True) and self.trainer.state.status == "finished":
            has_best = bool(getattr(self.trainer.checkpoint_callback, "best_model_path", ""))
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if has_best else None)


def cache_tool(args: list[str]) -> int:
    """``lkd cache verify DIR`` / ``lkd cache repair DIR [--used-at-least N]``; returns the exit status."""
    from lightning_kd.cache.repair import repair
    from lightning_kd.cache.verify import verify

    parser = argparse.ArgumentParser(prog="lkd cache", description="check or salvage a teacher-output cache")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("verify", help="report what is intact (exit status 1 if anything is damaged)").add_argument("dir")
    rep = sub.add_parser("repair", help="keep every intact output and every record of spending")
    rep.add_argument("dir")
    rep.add_argument("--used-at-least", type=int, default=None, help="samples known to be paid (e.g. from a bill)")
    ns = parser.parse_args(args)
    if ns.command == "verify":
        report = verify(ns.dir)
        print(report)
        return 0 if report.ok else 1
    print(repair(ns.dir, used_at_least=ns.used_at_least))
    return 0


def main(args: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if args is None else args)
    if args[:1] == ["cache"] and args[1:2] in (["verify"], ["repair"]):
        raise SystemExit(cache_tool(args[1:]))
    if args[:1] == ["cache"]:
        from lightning_kd.data import CachedTeacherDataModule

        cli = LKDCLI(run=False, args=args[1:])
        if not isinstance(cli.datamodule, CachedTeacherDataModule):
            raise SystemExit(
                f"lkd cache needs a CachedTeacherDataModule in `data`, got {type(cli.datamodule).__name__}"
            )
        cli.datamodule.fill()
        return
    cli = LKDCLI(args=args, save_config_kwargs={"overwrite": True})
    for logger in cli.trainer.loggers:  # close the W&B run so that a later run in this process starts its own
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


if __name__ == "__main__":
    main()
