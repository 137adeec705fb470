"""The layers the AlexNet backbone can return, torch-free: settings are checked before torch is imported."""
from __future__ import annotations

# DeCAF's layers, in network order: flattened avgpool (pool5), post-ReLU fc6 and fc7
LAYER_DIMS = {"pool5": 9216, "fc6": 4096, "fc7": 4096}
LAYERS = tuple(LAYER_DIMS)  # in network order
FC7_DIM = LAYER_DIMS["fc7"]
MIN_IMAGE_SIZE = 63  # smaller inputs shrink to nothing in AlexNet's third max-pool


def network_order(layers) -> list[str]:
    """``layers`` sorted as the network computes them (names it does not know last, as given)."""
    return [name for name in LAYERS if name in layers] + [name for name in layers if name not in LAYERS]
