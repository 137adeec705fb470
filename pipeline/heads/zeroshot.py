"""CLIP zero-shot classification as a head: a linear layer built from text, by CLIP's own recipe, on no train image.

Each class name (pipeline.heads.prompts) is put into the 80 templates of ``open_clip.zero_shot_metadata.
OPENAI_IMAGENET_TEMPLATES`` ("a bad photo of a {}.", ...); each text embedding (``encode_text``) is L2-normalised,
they are averaged over the templates, and the mean is L2-normalised again: the class vector t_c (open_clip's
``build_zero_shot_classifier``). The head is ``weight = exp(logit_scale) * t``, bias 0, on the image embedding
L2-normalised (the checkpoint records ``l2_normalize``), so its logits are CLIP's, ``exp(logit_scale) * cosine``,
and its probabilities softmax of them, wherever it runs (live, the export, the ONNX runtimes).

The text tower is the cache's own model (pipeline.backbones.open_clip_family.text_tower: the weights the cache
records, or ``--weights``, fingerprint checked), so the class vectors live in the space of the cached embeddings.

``fit`` is this head's entry point (pipeline.heads.interface): it reads no train row, scores val once and returns a
``ZeroShotResult``; pipeline.heads.publish writes its files.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from pipeline.backbones.catalog import EMBEDDING, ZOO_EXTRA, recorded_backbone
from pipeline.common.config import ZERO_SHOT_TEMPLATES
from pipeline.common.errors import UserError
from pipeline.heads.interface import HeadResult, HeadSettings, Predictions
from pipeline.heads.prompts import class_names
from pipeline.heads.readers import FeatureReader

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ZeroShotResult(HeadResult):
    """A zero-shot head: built from text, scored on val; no train image used, nothing chosen."""

    state: dict[str, torch.Tensor]  # {"weight": (C, D) exp(logit_scale) * class vectors, "bias": (C,) zeros}
    predictions: Predictions  # of the head on val
    class_names: tuple[str, ...]  # what filled the templates, in the cache's class order
    templates: int  # how many templates each class was averaged over
    logit_scale: float  # the model's learned log-temperature: logits are exp(logit_scale) * cosine
    fingerprint: str  # of the whole CLIP model the text came from (the cache's)


def templates() -> tuple:
    """open_clip's 80 ImageNet templates (callables: name -> sentence)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    if len(OPENAI_IMAGENET_TEMPLATES) != ZERO_SHOT_TEMPLATES:  # results record the count: it must be the truth
        raise UserError(f"this open_clip has {len(OPENAI_IMAGENET_TEMPLATES)} ImageNet templates, not "
                        f"{ZERO_SHOT_TEMPLATES}; install the zoo extra's pinned version: {ZOO_EXTRA}")
    return tuple(OPENAI_IMAGENET_TEMPLATES)


def class_vectors(encode_text, names: list[str], prompts: tuple, progress: bool = False) -> torch.Tensor:
    """(C, D) unit class vectors: per class, its sentences' embeddings L2-normalised, averaged, normalised again."""
    vectors = []
    for name in tqdm(names, desc="zero-shot classes", unit="class", disable=not progress, leave=False):
        embeddings = encode_text([template(name) for template in prompts]).double()  # (T, D)
        mean = torch.nn.functional.normalize(embeddings, dim=1).mean(0)
        vectors.append(torch.nn.functional.normalize(mean, dim=0))
    return torch.stack(vectors).float()


def _tower(settings: HeadSettings, record: dict):
    """The text tower of the cache's CLIP model (one line without the zoo extra, or for another backbone)."""
    try:
        from pipeline.backbones.open_clip_family import text_tower
    except ModuleNotFoundError as err:
        raise UserError(f"--head zeroshot needs open_clip ({err.name} is not installed): {ZOO_EXTRA}") from None
    config = settings.config
    return text_tower(record, weights=config.weights, seed=config.seed)


def _encoder(tower, device: torch.device):
    """``texts -> (N, D)`` float32 embeddings of the tower's model on ``device`` (80 sentences of 77 tokens per class:
    on a GPU in a fraction of the CPU's time), computed in fp32."""
    model = tower.model.to(device)

    def encode(texts: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            return model.encode_text(tower.tokenize(list(texts)).to(device)).float().cpu()

    return encode


@torch.inference_mode()
def score(weight: torch.Tensor, val: FeatureReader, device: torch.device) -> tuple[torch.Tensor, float, float]:
    """(top-1 class of each val row, top-1 %, top-5 %) of ``weight`` on the L2-normalised val rows, read in chunks."""
    weight = weight.to(device)
    top = min(5, len(weight))
    classes, hits1, hits5 = [], 0, 0
    for x, y in val.chunks(device)():
        ranked = (torch.nn.functional.normalize(x, dim=1) @ weight.T).topk(top, dim=1).indices  # (B, top)
        classes.append(ranked[:, 0].cpu())
        hits1 += int((ranked[:, 0] == y).sum())
        hits5 += int((ranked == y[:, None]).any(1).sum())
    count = max(val.num_rows, 1)
    return torch.cat(classes), 100.0 * hits1 / count, 100.0 * hits5 / count


def fit(train: FeatureReader, val: FeatureReader, settings: HeadSettings) -> ZeroShotResult:
    """The head from the class names and the cache's text tower; val scored once. No train row is read."""
    start = time.perf_counter()
    config, split = settings.config, train.split
    if settings.layer != EMBEDDING:
        raise UserError(f"--head zeroshot reads the image embedding, layer {EMBEDDING!r}, not {settings.layer!r} of "
                        f"{recorded_backbone(split.attrs)}; drop --layers (or pass --layers {EMBEDDING})")
    names = class_names(split.wnids, split.names, config.class_prompts)
    prompts = templates()
    tower = _tower(settings, split.attrs)
    vectors = class_vectors(_encoder(tower, settings.device), names, prompts, config.progress)  # (C, D)
    if vectors.shape[1] != split.feature_dim:  # the fingerprint is checked: a broken cache only
        raise UserError(f"{split.path} holds {split.feature_dim}-wide embeddings, but its CLIP model's text tower gives "
                        f"{vectors.shape[1]}; extract the cache again with run_extract.py --overwrite")
    weight = vectors * torch.tensor(tower.logit_scale, dtype=torch.float64).exp().float()
    state = {"weight": weight.contiguous(), "bias": torch.zeros(len(names))}
    classes, top1, top5 = score(weight, val, settings.device)
    log.info("zeroshot: %d classes x %d templates, logit scale %.2f: val top-1 %.2f%%", len(names), len(prompts),
             tower.logit_scale, top1)
    return ZeroShotResult(state=state, predictions=Predictions.of(classes.numpy(), val.labels, top1, top5),
                          class_names=tuple(names), templates=len(prompts), logit_scale=tower.logit_scale,
                          fingerprint=tower.fingerprint, train_images=0, seconds=time.perf_counter() - start)
