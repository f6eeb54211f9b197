"""Gap Preserving Distillation reparameterizations (Guo et al., ICLR 2025, arXiv 2410.04140).

``expand`` builds the wide dynamic teacher of a student by Inverse
Reparameterization (Sec. 3.2) with the student as a hard-shared sub-network
(Channel-Branch Reparameterization, Sec. 3.3); ``extract_student`` turns the
shared view back into a plain student. Pure torch: no Lightning code here.
"""

from lightning_kd.reparam.branches import ConvBranches
from lightning_kd.reparam.expand import (
    DynamicTeacher,
    ExpansionCheckError,
    UnsupportedLayerError,
    WideBatchNorm2d,
    WideConv2d,
    WideLayer,
    WideLinear,
    expand,
    wide_channels,
)
from lightning_kd.reparam.extract import extract_student

__all__ = [
    "ConvBranches",
    "DynamicTeacher",
    "ExpansionCheckError",
    "UnsupportedLayerError",
    "WideBatchNorm2d",
    "WideConv2d",
    "WideLayer",
    "WideLinear",
    "expand",
    "extract_student",
    "wide_channels",
]
