"""CLIP zero-shot as a head, against open_clip's own text tower: the class vectors, and the probabilities in the head,
the live runner and the exported graph under ONNX Runtime, all softmax(exp(logit_scale) * cosine).

open_clip ViT-B-32 with random weights (224 px, its only size) on a 2-class dataset of 6 val images, in one grid
beside an AlexNet cache (where zero-shot is skipped, saying why). Encoding 2 x 80 prompts is most of the time.
Needs the zoo extra, and the deploy extra for the export; skips, saying so.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

pytest.importorskip("open_clip", reason="the zoo extra is not installed: pip install -r requirements-zoo.txt")

import open_clip  # noqa: E402
import torch  # noqa: E402
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES  # noqa: E402

import run_extract  # noqa: E402
import run_train_head  # noqa: E402
import run_webcam  # noqa: E402
from features.cache import open_split  # noqa: E402
from pipeline.backbones import open_clip_family  # noqa: E402
from pipeline.data.synthetic import make_tiny_imagenet  # noqa: E402
from tests.conftest import CPU, FAST, one_error_line  # noqa: E402

CLIP = "open_clip:ViT-B-32"
FOLDER = "open_clip-ViT-B-32_embedding_zeroshot_0shot"  # its combination folder in the grid


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A 2-class dataset, its CLIP and AlexNet caches (random weights), and one grid of logreg and zeroshot on both."""
    root = tmp_path_factory.mktemp("zeroshot")
    ds = make_tiny_imagenet(root / "ds", num_classes=2, train_per_class=3, val_per_class=3)
    clip, alex, grid = root / "clip", root / "alex", root / "grid"
    assert run_extract.main(["--data", str(ds), "--out", str(clip), "--backbone", CLIP, "--weights", "random",
                             "--no-progress", "--precision", "fp32", *CPU]) == 0
    assert run_extract.main(["--data", str(ds), "--out", str(alex), *FAST]) == 0
    logger = logging.getLogger("pipeline.heads.experiments.grid")
    records = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        assert run_train_head.main([*CPU, "--features", f"{alex},{clip}", "--out", str(grid), "--head", "logreg,zeroshot",
                                    "--no-progress"]) == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    checkpoint = torch.load(grid / FOLDER / "best.pt", map_location="cpu", weights_only=True)
    return {"root": root, "ds": ds, "clip": clip, "grid": grid, "checkpoint": checkpoint,
            "log": "\n".join(record.getMessage() for record in records)}


def _zero_shot_is_a_head_of_0_shots_in_the_grid_and_skipped_on_a_cache_without_text(made):
    with open(made["grid"] / "experiments.csv") as f:
        rows = {(r["backbone"], r["layer"], r["head"], r["shots"], r["selected_by"], r["train_images"])
                for r in csv.DictReader(f)}
    assert ("alexnet", "fc7", "logreg", "all", "train-split", "6") in rows
    assert (CLIP, "embedding", "zeroshot", "0shot", "none", "0") in rows and len(rows) == 3
    assert "zeroshot: skipped on" in made["log"] and "alexnet features have no text tower" in made["log"]
    folder = made["grid"] / FOLDER
    result = json.loads((folder / "result.json").read_text())
    assert (result["head"], result["shots"], result["selected_by"], result["train_images"]) == ("zeroshot", 0, "none", 0)
    assert result["settings"]["templates"] == 80 and result["checkpoint"] == "best.pt"
    assert "zero-shot: no training images used" in (folder / "report.md").read_text()
    checkpoint, attrs = made["checkpoint"], open_split(made["clip"] / "train.h5", "embedding").attrs
    assert checkpoint["l2_normalize"] is True and checkpoint["epoch"] == 0
    assert checkpoint["weights_fingerprint"] == attrs["weights_fingerprint"] == checkpoint["config"]["text_fingerprint"]
    assert checkpoint["config"]["class_names"] == ["goldfish", "black stork"]


def _reference(checkpoint: dict) -> tuple[torch.Tensor, float]:
    """(class vectors (C, D), logit scale) computed apart from the head: open_clip's model, tokenizer and templates."""
    model = open_clip_family.load(CLIP, checkpoint["weights_spec"]).model
    tokenize = open_clip.get_tokenizer("ViT-B-32")
    vectors = []
    with torch.no_grad():
        for name in checkpoint["config"]["class_names"]:
            texts = model.encode_text(tokenize([template(name) for template in OPENAI_IMAGENET_TEMPLATES]))
            texts = texts / texts.norm(dim=-1, keepdim=True)
            mean = texts.mean(dim=0)
            vectors.append(mean / mean.norm())
    return torch.stack(vectors), float(model.logit_scale.exp())


@pytest.fixture(scope="module")
def reference(made):
    return _reference(made["checkpoint"])


def _the_class_vectors_equal_open_clips_encode_text_of_the_80_templates(made, reference):
    vectors, scale = reference
    head = made["checkpoint"]["head"]
    cosine = torch.nn.functional.cosine_similarity(head["weight"], vectors, dim=1)
    assert cosine.min() >= 0.9999
    assert torch.allclose(head["weight"].norm(dim=1), torch.full((2,), scale), rtol=1e-5)
    assert not head["bias"].any()


def _expected(made, reference) -> dict[str, torch.Tensor]:
    """{val image: softmax(exp(logit_scale) * cosine(cached embedding, class vector))}."""
    vectors, scale = reference
    val = open_split(made["clip"] / "val.h5", "embedding")
    rows = torch.nn.functional.normalize(torch.from_numpy(val.read_features()), dim=1)
    probs = torch.softmax(scale * rows @ vectors.T, dim=1)
    return {Path(path).name: p for path, p in zip(val.paths, probs)}


def _live(source: list[str], made, out: Path) -> dict[str, list[float]]:
    """Each val image's probabilities in class order, from run_webcam on ``source`` (a checkpoint or a graph)."""
    assert run_webcam.main([*source, "--source", str(made["ds"] / "val" / "images"), "--no-display", "--predictions",
                            str(out), "--top-k", "2"]) == 0
    wnids = made["checkpoint"]["class_wnids"]
    found = {}
    for item in map(json.loads, out.read_text().splitlines()):
        probs = {t["wnid"]: t["prob"] for t in item["topk"]}
        found[Path(item["source"]).name] = [probs[wnid] for wnid in wnids]
    return found


def _the_heads_probabilities_are_softmax_of_scaled_cosine(made, reference):
    expected = _expected(made, reference)
    checkpoint = made["checkpoint"]
    val = open_split(made["clip"] / "val.h5", "embedding")
    rows = torch.from_numpy(val.read_features())
    head = torch.nn.functional.normalize(rows, dim=1) @ checkpoint["head"]["weight"].T + checkpoint["head"]["bias"]
    for path, probs in zip(val.paths, torch.softmax(head, dim=1)):
        assert torch.allclose(probs, expected[Path(path).name], atol=1e-5)


def _live_and_the_onnx_export_give_softmax_of_scaled_cosine(made, reference, tmp_path):
    expected = _expected(made, reference)
    checkpoint = made["grid"] / FOLDER / "best.pt"
    runs = {"torch": _live(["--checkpoint", str(checkpoint), *CPU], made, tmp_path / "torch.jsonl")}
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ModuleNotFoundError:
        onnx_path = None  # the deploy extra is absent: live on torch only
    else:
        onnx_path = tmp_path / "zeroshot.onnx"
        assert run_webcam.main([*CPU, "--checkpoint", str(checkpoint), "--export", str(onnx_path)]) == 0
        assert json.loads(onnx_path.with_suffix(".json").read_text())["l2_normalize"] is True
        runs["onnxruntime"] = _live(["--onnx", str(onnx_path), "--runtime", "onnxruntime"], made, tmp_path / "ort.jsonl")
    for runtime, found in runs.items():
        assert set(found) == set(expected), runtime
        for name, probs in found.items():
            assert probs == pytest.approx(expected[name].tolist(), abs=1e-5), (runtime, name)
    if onnx_path is None:
        pytest.skip("the deploy extra is not installed (pip install -r requirements-deploy.txt): the export is untested")


def _a_rerun_of_the_grid_is_up_to_date_and_other_text_weights_are_one_line(made, tmp_path, capsys, caplog):
    """The zero-shot result is planned as it was written (--skip-existing keeps it, torch-free); a text tower of other
    weights than the cache's is refused by its fingerprint, before any file is written."""
    caplog.set_level(logging.INFO)
    features = f"{made['root'] / 'alex'},{made['clip']}"
    assert run_train_head.main([*CPU, "--features", features, "--out", str(made["grid"]), "--head", "logreg,zeroshot",
                                "--no-progress"]) == 0
    assert "is up to date" in caplog.text
    out = tmp_path / "other"
    capsys.readouterr()
    assert run_train_head.main([*CPU, "--features", str(made["clip"]), "--out", str(out), "--head", "zeroshot",
                                "--weights", "random", "--seed", "1", "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert "--weights random:seed=1 give a open_clip:ViT-B-32 with fingerprint" in line and "drop --weights" in line
    assert not (out / "run.json").exists()


def test_zero_shot_against_open_clip_in_a_grid_the_head_live_and_the_export(made, reference, tmp_path, capsys, caplog):
    """One test, so that one xdist worker builds the CLIP caches and encodes the 2 x 80 prompts twice (a module
    fixture is built again on every worker that runs one of its module's tests)."""
    for folder in ("rerun", "live"):
        (tmp_path / folder).mkdir()
    _zero_shot_is_a_head_of_0_shots_in_the_grid_and_skipped_on_a_cache_without_text(made)
    _the_class_vectors_equal_open_clips_encode_text_of_the_80_templates(made, reference)
    _the_heads_probabilities_are_softmax_of_scaled_cosine(made, reference)
    _a_rerun_of_the_grid_is_up_to_date_and_other_text_weights_are_one_line(made, tmp_path / "rerun", capsys, caplog)
    _live_and_the_onnx_export_give_softmax_of_scaled_cosine(made, reference, tmp_path / "live")  # skips last
