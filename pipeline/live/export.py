"""Export a checkpoint's classifier (backbone + head + softmax) as one ONNX graph, and its sidecar JSON.

The graph takes the network input (B, 3, S, S) float32, RGB, normalised with the recorded mean and std, and
returns (B, C) probabilities; the batch is dynamic, the opset pinned, every weight inside the one .onnx file
(AlexNet: ~230 MB). The sidecar ``<name>.json`` says what a consumer needs: the classes, the preprocessing
(resize, crop, interpolation, mean, std, channel order), the backbone's weights spec and fingerprint, the
layer (and whether the head reads it L2-normalised: the graph does that), the graph's sha256 and the project's
version. The graph carries the facts the runtimes use (classes, preprocessing, tensor names) in its own
metadata_props too, and the sidecar must agree (pipeline.live.sidecar).
Both files are written under temporary names and renamed once whole; an export replaces no file but an earlier
export's. Needs the optional extra (requirements-deploy.txt): torch's exporter uses onnx and onnxscript.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from pipeline.backbones.catalog import recorded_backbone
from pipeline.common.checkpoint import head_normalizes
from pipeline.common.config import LiveConfig
from pipeline.common.errors import UserError, first_line
from pipeline.common.names import ONNX_FORMAT, VERSION
from pipeline.common.preprocess import Preprocess
from pipeline.live.numpy_preprocess import TAPS
from pipeline.live.onnx_proto import NotOnnx, read_graph_header
from pipeline.live.overlay import check_output_paths
from pipeline.live.sidecar import FACT_PREFIX, file_sha256, graph_metadata, is_export_sidecar, sidecar_path
from pipeline.live.start import checkpoint_inputs, read_live_checkpoint
from pipeline.live.torch_classifier import build_classifier

log = logging.getLogger(__name__)

OPSET = 18  # pinned: what torch's exporter writes natively; ONNX Runtime and OpenCV's DNN both read it
INPUT, OUTPUT = "input", "probabilities"  # the graph's tensor names
INSTALL = "pip install -r requirements-deploy.txt"


class Probabilities(nn.Module):
    """The classifier with its softmax: what a consumer wants out of the graph."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(x), dim=1)  # (B, C)


def describe_preprocess(preprocess: Preprocess) -> dict:
    """The recorded preprocessing, spelled out for a consumer that has never seen this project."""
    return {**preprocess.to_dict(), "channel_order": "RGB", "layout": "NCHW", "dtype": "float32",
            "interpolation": preprocess.interpolation,  # read back by Preprocess.from_dict
            "resize_filter": f"{preprocess.interpolation}, antialiased (PIL / torchvision antialias=True), on uint8 pixels",
            "resize": ("the shorter side to resize_size, the longer int(resize_size * long / short)"
                       if preprocess.mode == "crop" else "the whole image to image_size x image_size"),
            "crop": "centre, image_size x image_size (top = round((height - image_size) / 2))",
            "normalize": "(pixel - 255 * mean) / (255 * std), per channel"}


def _require_exporter() -> None:
    missing = [name for name in ("onnx", "onnxscript") if not _importable(name)]
    if missing:
        raise UserError(f"--export needs {' and '.join(missing)} (torch's ONNX exporter); install the deploy extra: "
                        f"{INSTALL}")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _write_graph(model: nn.Module, size: int, path: Path, metadata: dict[str, str]) -> None:
    """The graph of ``model`` at ``path``, with ``metadata`` (the classes and preprocessing) in its metadata_props."""
    example = torch.zeros(2, 3, size, size)  # batch 2: a batch of 1 would be specialised by torch.export
    batch = torch.export.Dim("batch", min=1, max=1024)
    chatter = io.StringIO()  # the exporter prints its steps to stdout: kept out of the user's output
    try:
        with contextlib.redirect_stdout(chatter):
            program = torch.onnx.export(model, (example,), input_names=[INPUT], output_names=[OUTPUT],
                                        opset_version=OPSET, dynamo=True, dynamic_shapes=({0: batch},))
            program.model.metadata_props.update(metadata)
            for node in program.model.graph.all_nodes():  # where the exporter ran from: local paths, and counters
                node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)  # that differ between two exports
            program.save(str(path), external_data=False)
    except Exception as err:  # the exporter's own failures are many types; say which step failed
        raise UserError(f"torch's ONNX exporter failed ({first_line(err)[:200]}); try another torch, or report it") from None


def check_targets(config: LiveConfig, checkpoint: dict) -> None:
    """Refuse, before anything is built, an --export whose graph or sidecar would replace an input, or a file that
    is not an earlier export's (a run's run.json or config.json, your labels.json, the checkpoint)."""
    target = Path(config.export)
    sidecar = sidecar_path(target)
    check_output_paths({"--export": target, "--export sidecar": sidecar}, checkpoint_inputs(config, checkpoint))
    if (sidecar.exists() or sidecar.is_symlink()) and not is_export_sidecar(sidecar):
        raise UserError(f"--export {target} would replace {sidecar}, which is not an earlier export's sidecar; pass "
                        "another --export name (its .json goes beside it), or move that file away")
    if (target.exists() or target.is_symlink()) and not (is_export_sidecar(sidecar) or _carries_facts(target)):
        raise UserError(f"--export {target} would replace a file that is not an earlier export (no export's sidecar "
                        f"beside it); pass another --export name, or move that file away")


def _carries_facts(path: Path) -> bool:
    """Whether ``path`` is a graph this project exported (its metadata carries the classifier's facts)."""
    try:
        return FACT_PREFIX + "format" in read_graph_header(path).metadata
    except (NotOnnx, OSError):
        return False


def _sidecar(config: LiveConfig, checkpoint: dict, preprocess: Preprocess) -> dict:
    """The sidecar's fields but the graph's sha256: what a consumer needs to use the graph."""
    return {
        "format": ONNX_FORMAT, "version": VERSION, "onnx": Path(config.export).name, "onnx_sha256": "",
        "opset": OPSET, "input": INPUT, "output": OUTPUT, "num_classes": len(checkpoint["class_wnids"]),
        "class_wnids": list(checkpoint["class_wnids"]), "class_names": list(checkpoint["class_names"]),
        "preprocess": describe_preprocess(preprocess), "layer": checkpoint.get("layer", "fc7"),
        "l2_normalize": head_normalizes(checkpoint),  # the graph scales the layer to unit norm before the head
        "backbone": recorded_backbone(checkpoint), "weights_spec": config.weights or checkpoint["weights_spec"],
        "weights_fingerprint": checkpoint["weights_fingerprint"], "checkpoint": str(Path(config.checkpoint).resolve()),
        "checkpoint_epoch": checkpoint.get("epoch"), "metrics": checkpoint.get("metrics", {}),
    }


def export_classifier(config: LiveConfig) -> Path:
    """Write ``config.export`` (.onnx) and its sidecar from ``config.checkpoint``; return the .onnx path."""
    _require_exporter()
    checkpoint, preprocess = read_live_checkpoint(config)
    if preprocess.interpolation not in TAPS:  # what pipeline.live.numpy_preprocess ports bit for bit
        raise UserError(f"{recorded_backbone(checkpoint)}'s weights resize {preprocess.interpolation}, which the "
                        "exported runtimes' preprocessing does not do; run this head on torch (--checkpoint, no --export)")
    check_targets(config, checkpoint)
    fp32 = {**checkpoint, "precision": "fp32"}  # every runtime computes in fp32
    classifier = build_classifier(fp32, weights=config.weights, seed=config.seed, device="cpu")
    model = Probabilities(classifier.to(memory_format=torch.contiguous_format)).eval()
    target = Path(config.export)
    target.parent.mkdir(parents=True, exist_ok=True)
    sidecar = sidecar_path(target)
    partials = (target.with_name(f".{target.name}.partial"), sidecar.with_name(f".{sidecar.name}.partial"))
    meta = _sidecar(config, checkpoint, preprocess)
    try:
        _write_graph(model, preprocess.image_size, partials[0], graph_metadata(meta))
        meta["onnx_sha256"] = file_sha256(partials[0])  # of the whole file: the metadata too
        partials[1].write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(partials[0], target)  # the graph first: a sidecar never names a graph that is not there
        os.replace(partials[1], sidecar)
    finally:
        for leftover in partials:
            leftover.unlink(missing_ok=True)
    log.info("wrote %s (%.0f MB, opset %d, dynamic batch) and %s", target, target.stat().st_size / 2**20, OPSET, sidecar)
    return target
