"""Starting a live run: the classifier the settings ask for, and the checks made before anything is opened.

The torch runtime reads a checkpoint; the torch-free runtimes read an exported graph and its sidecar
(pipeline.live.onnx_runtimes). Each runtime's module is imported only when it is chosen, so ``--runtime
opencv`` never imports torch.
"""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.common.config import LiveConfig
from pipeline.common.errors import UserError
from pipeline.common.preprocess import Preprocess
from pipeline.backbones.catalog import hub_file, recorded_backbone
from pipeline.backbones.weights import describe_weights, weights_file
from pipeline.live.checks import check_memory
from pipeline.live.classifier import Classifier
from pipeline.live.overlay import check_output_paths

log = logging.getLogger(__name__)


def _source_files(config: LiveConfig) -> tuple[Path | None, Path | None]:
    """(the --source file, the --source folder): inputs no output may overwrite."""
    text = str(config.source).strip()
    source = None if text.isdigit() else Path(text).expanduser()
    folder = source if source is not None and source.is_dir() else None
    return (None if folder else source), folder


def check_outputs(config: LiveConfig, inputs: dict[str, Path | None]) -> None:
    """Refuse outputs that are inputs (``inputs``: {option: file} of the classifier), before anything is opened."""
    source, folder = _source_files(config)
    check_output_paths({"--output": config.output, "--predictions": config.predictions},
                       {"--source": source, **inputs}, folder)


def checkpoint_inputs(config: LiveConfig, checkpoint: dict) -> dict[str, Path | None]:
    """{option: file} of what a checkpoint's classifier is read from: the checkpoint and the backbone's weights."""
    spec = describe_weights(config.weights or checkpoint["weights_spec"], config.seed)
    hub_name = checkpoint.get("weights_file") or hub_file(recorded_backbone(checkpoint), spec)  # in the hub cache
    weights = weights_file(spec, hub_name)
    return {"--checkpoint": Path(config.checkpoint), "--weights": weights}


def read_live_checkpoint(config: LiveConfig) -> tuple[dict, Preprocess]:
    """(--checkpoint read and checked by its one reader, its preprocessing), once a frame of that preprocessing is
    known to fit in memory: before anything large is allocated. Imports torch."""
    from pipeline.common.checkpoint import checkpoint_preprocess, read_checkpoint

    checkpoint = read_checkpoint(config.checkpoint, weights_given=config.weights is not None)
    preprocess = checkpoint_preprocess(checkpoint)
    check_memory(preprocess, str(config.checkpoint))
    return checkpoint, preprocess


def torch_classifier(config: LiveConfig) -> Classifier:
    """The checkpoint's backbone + head on torch, its fields checked before anything large is allocated."""
    from pipeline.live.torch_classifier import TorchClassifier

    checkpoint, _ = read_live_checkpoint(config)
    check_outputs(config, checkpoint_inputs(config, checkpoint))
    return TorchClassifier(checkpoint, weights=config.weights, seed=config.seed, device=config.device,
                           precision=config.precision)


def open_classifier(config: LiveConfig) -> Classifier:
    """The classifier ``config`` names: --checkpoint on torch, or --onnx on onnxruntime or opencv."""
    if config.onnx is None:
        if config.runtime not in (None, "torch"):
            raise UserError(f"--runtime {config.runtime} runs an exported graph: export one with --export "
                            "classifier.onnx, then pass --onnx classifier.onnx")
        return torch_classifier(config)
    from pipeline.live.onnx_runtimes import onnx_classifier

    classifier, inputs = onnx_classifier(config.onnx, config.runtime)
    check_outputs(config, inputs)
    return classifier
