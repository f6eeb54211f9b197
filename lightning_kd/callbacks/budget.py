"""Log the teacher budget to every logger."""

from __future__ import annotations

import lightning as L


class TeacherBudgetMonitor(L.Callback):
    """Logs ``budget/used``, ``budget/remaining``, ``budget/lost`` and ``budget/new_calls`` of the DataModule's
    teacher budget at the start of training and at the end of every training epoch."""

    def _log(self, trainer: L.Trainer) -> None:
        dm = trainer.datamodule
        budget = getattr(dm, "budget_state", None)
        if budget is None or not trainer.loggers:
            return
        metrics = {
            "budget/used": budget.used,
            "budget/remaining": budget.remaining,
            "budget/lost": budget.lost,
            "budget/new_calls": getattr(dm, "new_teacher_calls", 0),
        }
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer)
