"""Wide model-level embeddings (class / register tokens, position embeddings) of vision transformers.

These are ``nn.Parameter`` attributes of the model itself, added to or concatenated with the residual stream, so
they widen like any activation of the stream: ``e'[..., j] = e[..., m(j)]``, no copy-count scaling; the student
view is ``e'[..., :C]`` (shared, GPD Sec. 3.3). The model's own forward reads them as attributes, so the DT's copy
of the model becomes an instance of a subclass (``WideVisionTransformer``) that adds no state and only reads
each embedding through a property: the wide parameter in DT mode, its leading ``C`` channels in student mode.
The wide parameters keep the model's own names (``cls_token``, ``pos_embed``) and the module stays picklable.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lightning_kd.reparam.layer import Copies, WideLayer, owned, wide_parameter

__all__ = ["WideVisionTransformer", "embedding_names", "has_embeddings", "widen_embeddings"]


def _embedding(name: str) -> property:
    def get(self: WideVisionTransformer) -> torch.Tensor | None:
        wide = self._parameters.get(name)
        if wide is None or not self.student_mode:
            return wide
        return wide[..., : self.student_embed_dim]

    return property(get, doc=f"The wide ``{name}``, or its student view in student mode.")


class WideVisionTransformer(VisionTransformer, WideLayer):
    """timm ``VisionTransformer`` of the DT: its layers are wide layers, its embeddings read as wide or student.

    Only made from a ``VisionTransformer`` by :func:`widen_embeddings` (class swap, no new state).
    """

    cls_token = _embedding("cls_token")
    reg_token = _embedding("reg_token")
    pos_embed = _embedding("pos_embed")
    student_embed_dim: int

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's embeddings; its layers' tensors come from the wide layers inside. (Not
        :func:`embedding_names`: its exact-type test fails on a subclass, such as FSDP2's
        ``FSDPWideVisionTransformer``.)"""
        names = [name for name in _NAMES if self._parameters.get(name) is not None]
        return {name: owned(self._parameters[name][..., : self.student_embed_dim]) for name in names}


_WIDE_MODELS: dict[type[nn.Module], type[WideLayer]] = {VisionTransformer: WideVisionTransformer}
_NAMES = ("cls_token", "reg_token", "pos_embed")


def has_embeddings(module: nn.Module) -> bool:
    """True for the model classes whose embeddings widen (exact types: a subclass may use them otherwise)."""
    return type(module) in _WIDE_MODELS or type(module) in _WIDE_MODELS.values()


def embedding_names(module: nn.Module) -> tuple[str, ...]:
    """The own parameters of ``module`` that widen as residual-stream embeddings."""
    if not has_embeddings(module):
        return ()
    return tuple(name for name in _NAMES if isinstance(module._parameters.get(name), nn.Parameter))


def widen_embeddings(model: nn.Module, student: nn.Module, ratio: float, noise_std: float = 0.0) -> None:
    """Give ``model`` (the DT's copy of ``student``) the wide embeddings of ``student`` and its wide class."""
    dim = student.embed_dim
    channels = Copies.widen(dim, ratio)
    for name in embedding_names(student):
        param = getattr(student, name)
        wide = param.detach()[..., channels.index(param.device)]
        setattr(model, name, wide_parameter(param, wide, noise_std, *param.shape[:-1], channels))
    model.__class__ = _WIDE_MODELS[type(student)]
    model.student_embed_dim = dim
