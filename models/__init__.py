"""Network code only: the AlexNet layer-cutting backbone, the linear head, and the two assembled.

``models.layers`` (the layer table) is torch-free; the networks are imported on first use, so importing
the table does not import torch (seconds).
"""
from models.layers import FC7_DIM, LAYER_DIMS, LAYERS, MIN_IMAGE_SIZE, network_order

_NETWORKS = ("AlexNetClassifier", "AlexNetLayers", "LinearHead", "weights_fingerprint")

__all__ = ["FC7_DIM", "LAYER_DIMS", "LAYERS", "MIN_IMAGE_SIZE", "network_order", *_NETWORKS]


def __getattr__(name: str):
    if name == "LinearHead":  # torch only: stage two imports no torchvision
        from models.head import LinearHead
        return LinearHead
    if name in _NETWORKS:
        from models import alexnet
        return getattr(alexnet, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
