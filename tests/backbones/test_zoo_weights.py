"""The zoo families' weights: --weights pretrained from the family's own local cache (offline), its absence as one
line naming the file and --weights FILE, state_dict files (.safetensors, .bin, .pth) and a wrong architecture.

A pre-filled Hugging Face cache in tmp_path (HF_HOME) holds seeded weights under the file name timm's loader looks
for; HF_HUB_OFFLINE=1 keeps every test off the network. Needs the zoo extra; skips, saying so, without it.
"""
from __future__ import annotations

import pytest

pytest.importorskip("timm", reason="the zoo extra is not installed: pip install -r requirements-zoo.txt")
pytest.importorskip("open_clip", reason="the zoo extra is not installed: pip install -r requirements-zoo.txt")

import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import run_extract  # noqa: E402
from models.backbones import weights_fingerprint  # noqa: E402
from pipeline.backbones import open_clip_family, timm_family  # noqa: E402
from pipeline.backbones.backbone import rebuild  # noqa: E402
from pipeline.common.errors import UserError  # noqa: E402
from tests.conftest import CPU, one_error_line  # noqa: E402

TAGGED = "timm:resnet18.a1_in1k"
REVISION = "0" * 40  # a commit hash, as the hub names snapshots


def fill_hf_cache(hf_home, repo: str, filename: str, state: dict) -> None:
    """``state`` saved where huggingface_hub caches ``repo``'s ``filename`` (refs/main -> snapshots/<commit>/)."""
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(REVISION)
    (folder / "snapshots" / REVISION).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "snapshots" / REVISION / filename))


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty Hugging Face cache and no network: HF_HOME in tmp_path, HF_HUB_OFFLINE=1."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


def test_pretrained_weights_load_from_the_local_cache_offline(offline):
    torch.manual_seed(3)
    model = timm.create_model("resnet18.a1_in1k")
    fill_hf_cache(offline, "timm/resnet18.a1_in1k", "model.safetensors", model.state_dict())
    loaded = timm_family.load(TAGGED, "pretrained")
    assert (loaded.weights, loaded.weights_enum) == ("pretrained", "hf-hub:timm/resnet18.a1_in1k")
    assert loaded.fingerprint == weights_fingerprint(model)  # the fingerprint covers the weights used
    assert timm_family.hub_file(TAGGED, "pretrained").endswith(f"snapshots/{REVISION}/model.safetensors")


@pytest.mark.parametrize("name, missing", [(TAGGED, "model.safetensors"),
                                           ("open_clip:ViT-B-32/laion2b_s34b_b79k", "open_clip_model.safetensors")])
def test_pretrained_weights_missing_offline_are_one_line_never_random(offline, tmp_path, capsys, name, missing):
    from pipeline.data.synthetic import make_tiny_imagenet

    data = make_tiny_imagenet(tmp_path / "ds", num_classes=2, train_per_class=1, val_per_class=1)
    assert run_extract.main(["--data", str(data), "--out", str(tmp_path / "out"), "--backbone", name, *CPU]) == 2
    line = one_error_line(capsys)
    assert missing in line and "HF_HUB_OFFLINE=1" in line and "--weights" in line and "Hugging Face cache" in line
    assert not (tmp_path / "out" / "train.h5").exists()


def test_a_name_without_a_tag_names_no_pretrained_weights():
    with pytest.raises(UserError, match=r"names no pretrained weights: add a tag, such as timm:resnet18\.\w+"):
        timm_family.load("timm:resnet18", "pretrained")
    with pytest.raises(UserError, match=r"names no pretrained weights: add a tag, such as open_clip:ViT-B-32/\w+"):
        open_clip_family.load("open_clip:ViT-B-32", "pretrained")
    with pytest.raises(UserError, match="--weights imagenet is not for timm models; pass pretrained"):
        timm_family.load("timm:resnet18", "imagenet")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_a_state_dict_file_of_the_architecture_loads_with_its_fingerprint(tmp_path, suffix):
    torch.manual_seed(5)
    model = timm.create_model("resnet18").eval()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(model.state_dict(), str(path))
    else:
        torch.save(model.state_dict(), path)
    loaded = timm_family.load("timm:resnet18", str(path))
    assert loaded.weights == f"file:{path}" and loaded.fingerprint == weights_fingerprint(model)


def test_a_file_of_another_architecture_names_its_first_mismatched_key(tmp_path):
    torch.manual_seed(0)
    save_file(timm.create_model("resnet10t").state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError) as refused:
        timm_family.load("timm:resnet18", str(tmp_path / "other.safetensors"))
    message = str(refused.value)
    assert "\n" not in message and "is not a state_dict of timm's resnet18: 'conv1.weight' is missing" in message
    torch.save({"visual.proj": torch.zeros(3)}, tmp_path / "clip.pth")
    with pytest.raises(UserError, match="is not a state_dict of open_clip's ViT-S-32-alt: '"):
        open_clip_family.load("open_clip:ViT-S-32-alt", str(tmp_path / "clip.pth"))


def test_open_clip_file_weights_rebuild_from_the_record(tmp_path):
    """A CLIP state_dict file: loaded with its fingerprint (the whole model, text tower included), and rebuilt from
    the record it makes; other weights are refused."""
    torch.manual_seed(2)
    import open_clip

    model = open_clip.create_model("ViT-S-32-alt")
    torch.save(model.state_dict(), tmp_path / "clip.pth")
    from pipeline.backbones.backbone import open_backbone

    backbone = open_backbone("open_clip:ViT-S-32-alt", str(tmp_path / "clip.pth"), progress=False)
    assert backbone.fingerprint == weights_fingerprint(model) and backbone.dims == {"embedding": 256}
    record = {**backbone.record(), "preprocess": backbone.preprocess.to_json()}
    assert rebuild(record).fingerprint == backbone.fingerprint
    with pytest.raises(UserError, match="fingerprint"):
        rebuild(record, weights="random")


def test_no_network_is_one_line_at_once_without_offline_mode(tmp_path, monkeypatch):
    """Not cached, HF_HUB_OFFLINE unset, and the hub's host does not resolve (as on a machine with no network): one
    line saying so, before huggingface_hub's retries (about 23 s a file)."""
    import socket

    from pipeline.backbones import zoo

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)

    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(UserError) as refused:
        zoo.hub_weights("timm/resnet18.a1_in1k", ["model.safetensors"], TAGGED)
    assert "no network: huggingface.co does not resolve" in str(refused.value) and "--weights" in str(refused.value)
