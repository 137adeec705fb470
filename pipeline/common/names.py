"""Names shared across the project, defined once. Torch-free, so the fast paths can import them.

Everything here is a plain value: precision and storage names, image suffixes, the checkpoint format
and the default places a run reads from and writes to.
"""
from __future__ import annotations

from pathlib import Path

from features.settings import DTYPES, PRECISIONS  # noqa: F401 - defined where the cache records them
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".webp", ".gif")  # what is indexed as an image, in datasets and live
# folders (what the decoder reads); matched without regard to case (.JPG, .Jpeg)
UNREAD_IMAGE_SUFFIXES = (".heic", ".heif", ".avif", ".tif", ".tiff", ".bmp", ".jxl", ".dng")  # photos the decoder
# cannot read: in a dataset, counted and listed skips (never silently ignored)
CHECKPOINT_FORMAT = "linear-head/1"  # a head checkpoint: an nn.Linear on one cached layer (any head that saves one)

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"

VAL_FRACTION = 0.2  # the share of a one-folder ImageFolder held out for val (run_extract.py --val-fraction)

DEFAULT_DATA = Path("data/tiny-imagenet-200")  # the dataset folder (or the zip beside it)
DEFAULT_FEATURES = Path("runs/features")  # the cache: train.h5 and val.h5
DEFAULT_HEAD = Path("runs/head")  # a head's run folder
DEFAULT_CHECKPOINT = DEFAULT_HEAD / "best.pt"
DEFAULT_PROJECT = Path("runs/app")  # run_webcam.py --serve: the project folder

PRETRAINED_SPECS = ("imagenet", "pretrained")  # weights read from the family's own cache (torchvision: imagenet)
VERSION = "0.8.0"  # the project's version: stamped into exported classifiers (the one place it is defined)
ONNX_FORMAT = "fc7-onnx-classifier/2"  # the sidecar JSON of an exported graph (pipeline.live.export); 2: the graph
# carries the classes and preprocessing in its metadata_props too, and the sidecar must agree (issue 29, finding 5)
ONNX_FORMATS_READ = ("fc7-onnx-classifier/1", ONNX_FORMAT)  # 1: a graph without them, run on its sidecar alone
