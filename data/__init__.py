"""Data loading: ``build_loader(config)`` for the ImageNet folder layout and the digits set."""
from .build import build_loader, build_transform, mixup_enabled
from .common import DataError

__all__ = ["DataError", "build_loader", "build_transform", "mixup_enabled"]
