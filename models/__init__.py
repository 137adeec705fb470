"""Network code only (no paths, no printing, no device choice): a frozen backbone cut at named graph nodes, each
node reduced to one vector per image (``backbones``), and the linear head trained on cached features (``head``).

Imported on first use, so ``import models`` does not import torch (seconds).
"""
_BACKBONES = ("LayerClassifier", "LayerFeatures", "weights_fingerprint")

__all__ = ["LinearHead", *_BACKBONES]


def __getattr__(name: str):
    if name == "LinearHead":  # torch only: stage two imports no torchvision
        from models.head import LinearHead
        return LinearHead
    if name in _BACKBONES:
        from models import backbones
        return getattr(backbones, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
