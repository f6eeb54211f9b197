"""CIFAR model zoo (ResNet, WRN, VGG as in RepDistiller; the shared teacher's layout) behind a timm-style registry;
forward hooks on named layers (:mod:`.hooks`)."""

from lightning_kd.models import cifar_resnet, rgb_resnet, vgg, wrn  # noqa: F401  (registers the zoo)
from lightning_kd.models.registry import create_model, is_zoo_model, list_models, register_model

__all__ = ["create_model", "is_zoo_model", "list_models", "register_model"]
