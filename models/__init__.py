"""Network code only: the AlexNet fc7 backbone, the linear head, and the two assembled."""
from models.alexnet import FC7_DIM, LAYER_DIMS, LAYERS, MIN_IMAGE_SIZE, AlexNetClassifier, AlexNetFC7, LinearHead, weights_fingerprint

__all__ = ["FC7_DIM", "LAYER_DIMS", "LAYERS", "MIN_IMAGE_SIZE", "AlexNetClassifier", "AlexNetFC7", "LinearHead", "weights_fingerprint"]
