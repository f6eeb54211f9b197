"""Gap Preserving Distillation reparameterizations (Guo et al., ICLR 2025, arXiv 2410.04140).

``expand`` builds the wide dynamic teacher of a student by Inverse
Reparameterization (Sec. 3.2) with the student as a hard-shared sub-network
(Channel-Branch Reparameterization, Sec. 3.3); ``extract_student`` turns the
shared view back into a plain student. Pure torch: no Lightning code here.
"""

from lightning_kd.reparam.attention import WideAttention, WidePvtAttention
from lightning_kd.reparam.branches import ConvBranches
from lightning_kd.reparam.conv import WideConv2d
from lightning_kd.reparam.embed import WideVisionTransformer
from lightning_kd.reparam.expand import ExpansionCheckError, expand
from lightning_kd.reparam.extract import extract_student
from lightning_kd.reparam.layer import Copies, UnsupportedLayerError, WideLayer, wide_channels
from lightning_kd.reparam.linear import WideLinear
from lightning_kd.reparam.norm import WideBatchNorm2d, WideLayerNorm, WideLayerScale, weighted_layer_norm
from lightning_kd.reparam.teacher import DynamicTeacher

__all__ = [
    "ConvBranches",
    "Copies",
    "DynamicTeacher",
    "ExpansionCheckError",
    "UnsupportedLayerError",
    "WideAttention",
    "WideBatchNorm2d",
    "WideConv2d",
    "WideLayer",
    "WideLayerNorm",
    "WideLayerScale",
    "WideLinear",
    "WidePvtAttention",
    "WideVisionTransformer",
    "expand",
    "extract_student",
    "weighted_layer_norm",
    "wide_channels",
]
