"""The zero-shot head without the zoo extra: where it runs (CLIP caches only, once, at 0 shots), its class names and
--class-prompts, and its refusals, each one line before anything is trained. Its fidelity against open_clip is
tests/backbones/test_zoo_zeroshot.py's (with the extra)."""
from __future__ import annotations

from pathlib import Path

import pytest

import run_train_head
from pipeline.common.config import HeadConfig
from pipeline.common.errors import UserError
from pipeline.heads.plan import normalized, plan_run
from pipeline.heads.prompts import class_names
from tests.helpers import CPU_ARGS, one_error_line, write_synthetic_cache

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
