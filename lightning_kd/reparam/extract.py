"""Extract the trained student from a dynamic teacher (GPD Sec. 3.3, CBR).

Under hard sharing the student has no parameters of its own: it is a scaled
slice of the DT (with CBR branches merged into each 3x3 kernel). Extraction
materialises that view as an ordinary instance of the student's class.
"""

from __future__ import annotations

import copy

from torch import nn

from lightning_kd.reparam.teacher import DynamicTeacher

__all__ = ["extract_student"]


def extract_student(dt: DynamicTeacher) -> nn.Module:
    """A standalone student (its original class and layers) equal to ``dt.forward_student``.

    Built from the DT's storage-free ``meta`` template and filled by a strict
    ``load_state_dict(dt.student_state_dict(), assign=True)``, so it lands on
    the DT's device and dtype without allocating a second copy. Per-module
    train/eval flags are copied from the DT (from the wide layer for children it lacks).
    """
    student = copy.deepcopy(dt.student_template)
    student.load_state_dict(dt.student_state_dict(), strict=True, assign=True)
    leftover = [name for name, t in [*student.named_parameters(), *student.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"extracted student has tensors the state dict does not set: {leftover}")
    modes = {path: m.training for path, m in dt.model.named_modules()}
    for path, module in student.named_modules():
        while path not in modes:  # a wide layer may lack the student's trivial children (attention's q_norm)
            path = path.rpartition(".")[0]
        module.training = modes[path]
    return student
