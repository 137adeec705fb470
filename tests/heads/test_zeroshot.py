"""The zero-shot head without the zoo extra: where it runs (CLIP caches only, once, at 0 shots), its class names and
--class-prompts, and its refusals, each one line before anything is trained. Its fidelity against open_clip is
tests/backbones/test_zoo_zeroshot.py's (with the extra)."""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import run_train_head
from features.cache import open_split
from pipeline.common.config import HeadConfig
from pipeline.common.errors import UserError
from pipeline.heads.plan import normalized, plan_run
from pipeline.heads.prompts import class_names
from tests.helpers import CPU_ARGS, one_error_line, tree_bytes, write_synthetic_cache

CLIP = "open_clip:ViT-B-32/laion2b_s34b_b79k"


def train(features, out: Path, *extra: str) -> int:
    return run_train_head.main(["--features", str(features), "--out", str(out), *CPU_ARGS, "--no-progress", *extra])


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    """Two small caches of one dataset: AlexNet's and one recorded as a CLIP model's (layer fc7: no CLIP is built)."""
    root = tmp_path_factory.mktemp("zeroshot")
    return {backbone: write_synthetic_cache(root / backbone.replace(":", "-").replace("/", "-"), classes=3,
                                            train_per_class=4, val_per_class=2, dim=8, backbone=backbone)
            for backbone in ("alexnet", CLIP)}


def test_zero_shot_on_a_cache_without_a_text_tower_is_one_line(caches, tmp_path, capsys):
    for heads in ("zeroshot", "logreg,zeroshot"):
        assert train(caches["alexnet"], tmp_path / "out", "--head", heads) == 2
        line = one_error_line(capsys)
        assert "--head zeroshot needs a CLIP cache" in line and "holds alexnet features" in line
        assert "--backbone open_clip:" in line
    assert not (tmp_path / "out" / "run.json").exists()


def test_the_plan_runs_zero_shot_once_at_0_shots_on_clip_caches_only(caches, tmp_path):
    """Planned torch-free (as --skip-existing plans): --shots does not multiply it; AlexNet's cache is left out."""
    features = f"{caches['alexnet']},{caches[CLIP]}"
    config = normalized(HeadConfig(features=features, out=tmp_path, head=("linear", "zeroshot"), shots=(1, None),
                                   layers=("fc7",)))
    grid, places = plan_run(config)
    assert grid and [(p.label, p.head, p.shots) for p in places] == [
        ("alexnet", "linear", 1), ("alexnet", "linear", None),
        (CLIP, "linear", 1), (CLIP, "linear", None), (CLIP, "zeroshot", 0)]
    zero = places[-1]
    assert zero.place == "open_clip-ViT-B-32-laion2b_s34b_b79k_fc7_zeroshot_0shot"
    assert zero.settings == {"templates": 80, "class_prompts": None, "weights": None, "select": "none",
                             "select_fraction": None}
    alone, [place] = plan_run(normalized(HeadConfig(features=caches[CLIP], out=tmp_path, head=("zeroshot",),
                                                    shots=(5, None), layers=("fc7",))))
    assert not alone and (place.head, place.shots, place.results) == ("zeroshot", 0, ("",))


def test_class_names_read_underscores_as_spaces_and_a_prompts_file_replaces_them(tmp_path):
    assert class_names(["n01", "sea_lion"], ["goldfish", "sea_lion"], None) == ["goldfish", "sea lion"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# my classes, in the cache's order\ngoldfish\n\n  a sea lion on a rock  \n")
    assert class_names(["n01", "sea_lion"], ["goldfish", "sea_lion"], prompts) == ["goldfish", "a sea lion on a rock"]
    prompts.write_text("goldfish\n")
    with pytest.raises(UserError, match=r"names 1 class, but the cache has 2: give one line per class, in the "
                                        r"cache's order \(n01, sea_lion\)"):
        class_names(["n01", "sea_lion"], ["goldfish", "sea_lion"], prompts)
    with pytest.raises(UserError, match="no such file"):
        class_names(["n01"], ["goldfish"], tmp_path / "missing.txt")


def test_a_prompts_file_of_the_wrong_count_is_one_line_before_any_head_trains(caches, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("goldfish\nblack stork\n")
    out = tmp_path / "out"
    assert train(caches[CLIP], out, "--head", "linear,zeroshot", "--layers", "fc7", "--class-prompts", str(prompts)) == 2
    line = one_error_line(capsys)
    assert f"--class-prompts {prompts} names 2 classes, but the cache has 3" in line
    assert not (out / "run.json").exists() and not list(out.glob("*_linear_*"))  # nothing trained


@pytest.mark.parametrize("flag", [("--class-prompts", "p.txt"), ("--weights", "clip.safetensors")])
def test_the_zero_shot_flags_without_the_zero_shot_head_are_one_line(caches, tmp_path, capsys, flag):
    assert train(caches["alexnet"], tmp_path / "out", "--head", "logreg", *flag) == 2
    assert f"{flag[0]} is for --head zeroshot" in one_error_line(capsys)


# ---------------------------------------------------------------------------------------------
# The head end to end with a stand-in text tower (open_clip's own is tests/backbones/test_zoo_zeroshot.py's)

DIM = 8
SCALE = math.log(1 / 0.07)  # CLIP's initial logit_scale


class StandInModel(torch.nn.Module):
    """encode_text of token ids: a fixed random vector per sentence (the sentence's CRC seeds it)."""

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randn(DIM, generator=torch.Generator().manual_seed(int(t))) for t in tokens])


def tokenize(texts: list[str]) -> torch.Tensor:
    return torch.tensor([zlib.crc32(text.encode()) for text in texts])


TEMPLATES = tuple((lambda name, i=i: f"photo {i} of a {name}.") for i in range(80))


def stand_in_vectors(names: list[str]) -> torch.Tensor:
    """The recipe computed here: each sentence normalised, the mean over the templates normalised."""
    vectors = []
    for name in names:
        texts = StandInModel().encode_text(tokenize([template(name) for template in TEMPLATES]))
        mean = (texts / texts.norm(dim=1, keepdim=True)).mean(0)
        vectors.append(mean / mean.norm())
    return torch.stack(vectors)


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    """A CLIP-recorded cache of 8-d 'embeddings', and a text tower and templates that need no open_clip."""
    from pipeline.heads import zeroshot

    tower = SimpleNamespace(model=StandInModel(), tokenize=tokenize, logit_scale=SCALE, fingerprint="f" * 64)
    monkeypatch.setattr(zeroshot, "_tower", lambda settings, record: tower)
    monkeypatch.setattr(zeroshot, "templates", lambda: TEMPLATES)
    return write_synthetic_cache(tmp_path / "clip", classes=3, train_per_class=4, val_per_class=3, dim=DIM,
                                 backbone=CLIP, layer="embedding")


def test_the_head_is_clips_recipe_published_as_an_ordinary_checkpoint(stand_in, tmp_path):
    out = tmp_path / "run"
    assert train(stand_in, out, "--head", "zeroshot") == 0
    checkpoint = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    names = ["goldfish", "black stork", "walking stick"]
    assert checkpoint["config"]["class_names"] == names and checkpoint["l2_normalize"] is True
    torch.testing.assert_close(checkpoint["head"]["weight"], math.exp(SCALE) * stand_in_vectors(names))
    assert not checkpoint["head"]["bias"].any() and checkpoint["layer"] == "embedding"
    result = json.loads((out / "result.json").read_text())
    assert (result["shots"], result["selected_by"], result["train_images"], result["checkpoint"]) == (0, "none", 0,
                                                                                                       "best.pt")
    val = open_split(stand_in / "val.h5", "embedding")
    rows = torch.nn.functional.normalize(torch.from_numpy(val.read_features()), dim=1)
    top1 = 100.0 * float((torch.argmax(rows @ checkpoint["head"]["weight"].T, 1).numpy() == val.labels).mean())
    assert result["top1"] == pytest.approx(top1) and checkpoint["metrics"]["val_top1"] == pytest.approx(top1)
    assert "CLIP zero-shot: no training images used" in (out / "report.md").read_text()
    assert (out / "classes.csv").read_text().splitlines()[1] == "n01443537,goldfish,goldfish"


def test_a_prompts_file_names_the_classes_and_a_changed_one_is_trained_again(stand_in, tmp_path, caplog):
    prompts, out = tmp_path / "prompts.txt", tmp_path / "grid"
    prompts.write_text("a goldfish\na stork\na stick insect\n")
    grid = ("--head", "logreg,zeroshot", "--class-prompts", str(prompts))
    assert train(stand_in, out, *grid) == 0
    checkpoint = torch.load(out / "embedding_zeroshot_0shot" / "best.pt", map_location="cpu", weights_only=True)
    vectors = stand_in_vectors(["a goldfish", "a stork", "a stick insect"])
    torch.testing.assert_close(checkpoint["head"]["weight"], math.exp(SCALE) * vectors)
    caplog.set_level(logging.INFO)
    assert train(stand_in, out, *grid) == 0 and "is up to date" in caplog.text
    prompts.write_text("a goldfish\na heron\na stick insect\n")
    caplog.clear()
    assert train(stand_in, out, *grid) == 0
    assert "[1/2]" not in caplog.text and "[2/2] embedding zeroshot 0shot" in caplog.text  # logreg kept
    checkpoint = torch.load(out / "embedding_zeroshot_0shot" / "best.pt", map_location="cpu", weights_only=True)
    assert checkpoint["config"]["class_names"][1] == "a heron"


def test_disk_full_while_writing_the_zero_shot_checkpoint_leaves_the_previous_run(stand_in, tmp_path, monkeypatch,
                                                                                  capsys):
    from features import atomic
    from pipeline.heads.publish import zeroshot as publish

    out = tmp_path / "run"
    assert train(stand_in, out, "--head", "zeroshot") == 0
    before = tree_bytes(out, skip=(".lock",))
    real = publish.save_checkpoint

    def save(checkpoint, path):
        monkeypatch.setattr(atomic, "open", FullFile, raising=False)  # the real write path fails
        real(checkpoint, path)

    monkeypatch.setattr(publish, "save_checkpoint", save)
    capsys.readouterr()
    assert train(stand_in, out, "--head", "zeroshot") == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and "best.pt" in line and "previous run" in line
    assert tree_bytes(out, skip=(".lock",)) == before


class FullFile:
    """A file object whose writes fail with ENOSPC (what a full disk does)."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    flush = write
