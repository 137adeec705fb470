"""Backbones as the stages use them: the torchvision catalogue (catalog), loading and placing on a device
(loading), weights specs and stamps (weights), and the compute precision (precision, precision_timing).

``python -m pipeline.common.backbones.catalog NAME`` (or the shorter ``python -m pipeline.common.backbones NAME``) prints one model's layer names."""
