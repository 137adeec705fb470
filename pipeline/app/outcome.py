"""What a trained head gives the page: its evaluation, the live classifier, and the downloads.

- Evaluation: the head of ``DIR/heads/<head>/best.pt`` on the cached features of a split (val by default: whole
  bursts held out, as the command line holds them out), per-class accuracy, the confusion matrix, and which images
  fell in each cell (so the page can show their thumbnails).
- Live: the classifier the live runner uses (pipeline.live.start.open_classifier): torch on the checkpoint, or the
  exported graph on ONNX Runtime or OpenCV; opened once and opened again when the checkpoint changes.
- Export: ``run_webcam.py --export`` (pipeline.live.export.export_classifier) into ``DIR/export/``, and the
  ImageFolder as a zip.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import zipfile
from pathlib import Path

import cv2
import numpy as np

from pipeline.app.files import AppError
from pipeline.app.training import HEADS, head_dir
from pipeline.common.config import LiveConfig
from pipeline.common.errors import UserError

log = logging.getLogger(__name__)

EXPORT_NAME = "classifier.onnx"


def latest_checkpoint(root: Path) -> Path:
    """The newest finished head run's best.pt under ``DIR/heads``; 404 when none was trained."""
    found = [head_dir(root, head) / "best.pt" for head in HEADS if (head_dir(root, head) / "best.pt").is_file()]
    if not found:
        raise AppError("no head is trained yet in this project: press Train first", 404)
    return max(found, key=lambda path: path.stat().st_mtime_ns)


def evaluate(root: Path, split: str = "val") -> dict:
    """Per-class accuracy and the confusion matrix of the newest head on the cached ``split``, with the images of
    each cell. Rows of classes the head does not know (added since it was trained) are counted, not scored."""
    import h5py
    import torch

    from pipeline.common.checkpoint import load_head, read_checkpoint

    if split not in ("val", "train"):
        raise AppError(f"split {split!r}: use val or train", 400)
    path = latest_checkpoint(root)
    checkpoint = read_checkpoint(path)
    cache = Path(root) / "features" / f"{split}.h5"
    if not cache.is_file():
        raise AppError(f"there is no {split} cache in this project: press Train first", 404)
    with h5py.File(cache, "r") as f:
        features = np.asarray(f[checkpoint["layer"]], dtype=np.float32)
        labels = np.asarray(f["labels"])
        paths = [p.decode() if isinstance(p, bytes) else str(p) for p in f["paths"][:]]
        wnids = [w.decode() if isinstance(w, bytes) else str(w) for w in f["class_wnids"][:]]
    names = list(checkpoint["class_names"])
    known = {wnid: i for i, wnid in enumerate(checkpoint["class_wnids"])}
    truth = np.array([known.get(wnids[label], -1) for label in labels], dtype=np.int64)
    with torch.no_grad():
        predicted = load_head(checkpoint)(torch.from_numpy(features)).argmax(1).numpy() if len(features) else \
            np.zeros(0, np.int64)
    return {"head": path.parent.name, "split": split, "checkpoint_mtime": path.stat().st_mtime,
            **confusion(names, truth, predicted, paths)}


def confusion(names: list[str], truth: np.ndarray, predicted: np.ndarray, paths: list[str]) -> dict:
    """The matrix (rows: true class, columns: predicted), per-class accuracy and each cell's images."""
    n = len(names)
    matrix = np.zeros((n, n), dtype=np.int64)
    cells: dict[str, list[dict]] = {}
    for true, pred, path in zip(truth, predicted, paths):
        if true < 0:
            continue
        matrix[true, pred] += 1
        folder, _, file = path.replace("\\", "/").rpartition("/")
        cells.setdefault(f"{true},{pred}", []).append({"class": folder.rsplit("/", 1)[-1], "name": file})
    per_class = [{"name": names[i], "images": int(matrix[i].sum()), "correct": int(matrix[i, i]),
                  "accuracy": float(matrix[i, i] / matrix[i].sum()) if matrix[i].sum() else None} for i in range(n)]
    scored = int(matrix.sum())
    return {"classes": names, "matrix": matrix.tolist(), "per_class": per_class, "cells": cells,
            "accuracy": float(np.trace(matrix) / scored) if scored else None, "images": scored,
            "unscored": int((truth < 0).sum())}


class LiveModel:
    """The live runner's classifier for the page, opened on first use and again when its file changes."""

    def __init__(self, root: Path, precision: str = "auto", device: str = "auto"):
        self.root, self.precision, self.device = Path(root), precision, device
        self.lock = threading.Lock()
        self.opened: dict[str, tuple[tuple, object]] = {}

    def classifier(self, runtime: str = "torch"):
        from pipeline.live.start import open_classifier

        if runtime == "torch":
            path = latest_checkpoint(self.root)
            config = LiveConfig(checkpoint=path, precision=self.precision, device=self.device)
        elif runtime == "onnx":
            path = self.root / "export" / EXPORT_NAME
            if not path.is_file():
                raise AppError("no exported classifier yet: press Export first", 404)
            config = LiveConfig(onnx=path)
        else:
            raise AppError(f"runtime {runtime!r}: use torch or onnx", 400)
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        with self.lock:
            if runtime not in self.opened or self.opened[runtime][0] != key:
                self.opened[runtime] = (key, open_classifier(config))
            return self.opened[runtime][1]

    def warm(self) -> None:
        """Open the new head's torch classifier and run it once (``auto`` precision measures on its first frame), so
        that the first live frame after a training is answered at once. A failure here is the live view's to report."""
        try:
            classifier = self.classifier("torch")
            with self.lock:
                classifier.predict([np.zeros((480, 640, 3), np.uint8)])
        except (UserError, OSError) as err:
            log.warning("the live classifier could not be opened yet: %s", err)

    def predict(self, jpeg: bytes, runtime: str = "torch") -> tuple[np.ndarray, list[str]]:
        """(class probabilities, class names) of one JPEG frame, decoded as the live runner decodes a camera's."""
        bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR) if jpeg else None
        if bgr is None:
            raise AppError("a live frame is not an image", 415)
        classifier = self.classifier(runtime)
        with self.lock:  # one forward pass at a time: the newest frame wins, the others were dropped
            probs = classifier.predict([cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)])[0]
        return probs, list(classifier.classes.names)


def export_onnx(root: Path) -> Path:
    """``run_webcam.py --export DIR/export/classifier.onnx --checkpoint <the newest head>``: the graph and its
    sidecar, written whole by the export stage."""
    from pipeline.live.export import export_classifier

    target = Path(root) / "export" / EXPORT_NAME
    try:
        return export_classifier(LiveConfig(checkpoint=latest_checkpoint(root), export=target))
    except ImportError as err:
        raise UserError(f"export needs the deploy extra ({err.name} is missing): pip install -r "
                        "requirements-deploy.txt") from None


def dataset_zip(root: Path) -> Path:
    """The ImageFolder ``DIR/images`` as a zip in a hidden temporary file of the project (the caller removes it)."""
    images = Path(root) / "images"
    handle, name = tempfile.mkstemp(prefix=".dataset-", suffix=".zip.partial", dir=root)
    os.close(handle)
    try:
        with zipfile.ZipFile(name, "w", zipfile.ZIP_STORED) as archive:  # JPEGs do not compress
            for folder in sorted(p for p in images.iterdir() if p.is_dir() and not p.name.startswith(".")):
                for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
                    archive.write(file, f"images/{folder.name}/{file.name}")
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)
