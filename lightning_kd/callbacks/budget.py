"""Log the teacher budget to every logger."""

from __future__ import annotations

import lightning as L


class TeacherBudgetMonitor(L.Callback):
    """Logs the DataModule's teacher budget — ``budget/used``, ``budget/in_flight`` (other live writers),
    ``budget/lost``, ``budget/remaining``, ``budget/new_calls`` (this run), and ``budget/spent`` when the teacher
    has a ``cost_per_sample`` / ``cost_per_request`` — at the start of training and after every training epoch."""

    def _log(self, trainer: L.Trainer) -> None:
        dm = trainer.datamodule
        budget = getattr(dm, "budget_state", None)
        if budget is None or not trainer.loggers or not trainer.is_global_zero:
            return
        s = budget.summary()
        metrics = {
            "budget/used": budget.used,
            "budget/in_flight": s.in_flight,
            "budget/lost": s.lost,
            "budget/remaining": budget.remaining,
            "budget/new_calls": getattr(dm, "new_teacher_calls", 0),
        }
        teacher = getattr(dm, "teacher", None)
        per_sample = getattr(teacher, "cost_per_sample", 0) or 0
        per_request = getattr(teacher, "cost_per_request", 0) or 0
        if per_sample or per_request:
            metrics["budget/spent"] = s.used * per_sample + s.requests * per_request
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer)
