"""The frozen AlexNet backbone (pipeline.backbones, its catalog entry): where its weights come from, and what it
computes."""
from __future__ import annotations

import functools
import http.server
import os
import socket
import threading
from pathlib import Path

import h5py
import pytest
import torch
import torchvision

import pipeline.backbones.torchvision_family as family
import run_extract
from models import LayerClassifier, LinearHead, weights_fingerprint
from pipeline.common.errors import UserError
from pipeline.common.hardware import resolve_device
from tests.helpers import SMALL_INPUT_ARGS, error_line

IMAGENET_FILE = "alexnet-owt-7be5be79.pth"
FC7_DIM = 4096


def load_backbone(spec: str, *, seed: int = 0) -> tuple[torch.nn.Module, str, str]:
    """(AlexNet cut after fc7, the recorded spec, the fingerprint) from the family's real loader (not the
    session's cached copy of random weights)."""
    loaded = getattr(family.load, "__wrapped__", family.load)("alexnet", spec, seed=seed)
    return loaded.model, loaded.weights, loaded.fingerprint


def imagenet_cache_file() -> Path:
    return family.hub_path(torchvision.models.AlexNet_Weights.IMAGENET1K_V1)


def fc7_of(model: torch.nn.Module):
    """The fc7 cut as one network: x -> (B, 4096) post-ReLU fc7, through the backbone's own layer module."""
    features = family.features(model, [family.entry("alexnet").layers["fc7"]])
    return lambda x: features(x)["fc7"]


def cut_fingerprint(alexnet: torchvision.models.AlexNet) -> str:
    """The fingerprint AlexNet caches have always recorded: the tensors of features, fc6 and fc7 (not fc8)."""
    import copy

    cut = copy.deepcopy(alexnet)
    cut.classifier = cut.classifier[:6]
    return weights_fingerprint(cut)


@functools.lru_cache(maxsize=None)
def seeded_alexnet(seed: int) -> torchvision.models.AlexNet:
    """``torch.manual_seed(seed); alexnet(weights=None)``, made once per seed (do not modify it)."""
    torch.manual_seed(seed)
    return torchvision.models.alexnet(weights=None)


def assert_same_weights(backbone: torch.nn.Module, alexnet: torchvision.models.AlexNet) -> None:
    """The backbone holds exactly alexnet's features and fc6/fc7 tensors."""
    mine, theirs = backbone.state_dict(), alexnet.state_dict()
    assert set(mine) == {k for k in theirs if not k.startswith("classifier.6.")}
    for name, tensor in mine.items():
        assert torch.equal(tensor, theirs[name]), name


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dataset(generated_dataset) -> Path:
    return generated_dataset(2, 2, 1)  # read-only


@pytest.fixture(scope="module")
def saved_alexnet(tmp_path_factory) -> tuple[Path, torchvision.models.AlexNet]:
    """A torchvision AlexNet (seed 3) and its state_dict saved with torch.save."""
    model = seeded_alexnet(3)
    path = tmp_path_factory.mktemp("weights") / "my-alexnet.pth"
    torch.save(model.state_dict(), path)
    return path, model


def run_cli(dataset: Path, out: Path, capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = run_extract.main(["--data", str(dataset), "--out", str(out), *SMALL_INPUT_ARGS, *args])
    return rc, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# --weights random


@pytest.fixture(scope="module")
def random0() -> tuple[torch.nn.Module, str, str]:
    return load_backbone("random", seed=0)


def test_random_weights_are_seeded_torchvision_alexnet(random0, saved_alexnet):
    backbone, spec, fingerprint = random0
    assert spec == "random:seed=0"
    assert_same_weights(backbone, seeded_alexnet(0))
    assert fingerprint == cut_fingerprint(seeded_alexnet(0))
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0

    backbone3, spec3, fingerprint3 = load_backbone("random", seed=3)
    assert spec3 == "random:seed=3"
    assert_same_weights(backbone3, saved_alexnet[1])  # that is seeded_alexnet(3)
    assert fingerprint3 == cut_fingerprint(saved_alexnet[1])
    assert fingerprint3 != fingerprint


def test_fingerprint_is_stable(random0):
    torch.manual_seed(12345)  # the global RNG state before the call does not matter
    torch.rand(10)
    backbone, spec, fingerprint = load_backbone("random:seed=0")  # the spec as a cache records it
    assert spec == random0[1] and fingerprint == random0[2]
    assert weights_fingerprint(backbone) == fingerprint


# ---------------------------------------------------------------------------------------------
# --weights PATH


def test_weights_file_loads_with_the_fingerprint_of_the_saved_model(saved_alexnet, dataset, tmp_path, capsys):
    path, model = saved_alexnet
    backbone, spec, fingerprint = load_backbone(str(path))
    assert spec == f"file:{path.resolve()}"
    assert_same_weights(backbone, model)
    assert fingerprint == cut_fingerprint(model)

    out = tmp_path / "features"
    rc, err = run_cli(dataset, out, capsys, "--weights", str(path))
    assert rc == 0, err
    with h5py.File(out / "train.h5", "r") as f:
        assert f.attrs["weights_spec"] == spec
        assert f.attrs["weights_fingerprint"] == fingerprint


def _garbage(folder: Path) -> Path:
    path = folder / "garbage.pth"
    path.write_bytes(os.urandom(4096))
    return path


def _empty(folder: Path) -> Path:
    path = folder / "empty.pth"
    path.write_bytes(b"")
    return path


def _resnet(folder: Path) -> Path:
    path = folder / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def _wrong_shapes(folder: Path) -> Path:
    path = folder / "alexnet-10-classes.pth"
    state = dict(seeded_alexnet(0).state_dict())
    state["classifier.6.weight"], state["classifier.6.bias"] = torch.zeros(10, 4096), torch.zeros(10)
    torch.save(state, path)
    return path


def _not_a_state_dict(folder: Path) -> Path:
    path = folder / "list.pth"
    torch.save([torch.zeros(3)], path)
    return path


def _missing(folder: Path) -> Path:
    return folder / "no-such-weights.pth"


@pytest.mark.parametrize("make, expected", [
    (_garbage, "not a readable PyTorch weights file"),
    (_empty, "not a readable PyTorch weights file"),
    (_resnet, "does not fit torchvision's alexnet"),
    (_wrong_shapes, "classifier.6.weight"),
    (_not_a_state_dict, "does not hold a state_dict"),
    (_missing, "weights file not found"),
], ids=["garbage", "empty", "resnet18", "wrong-shapes", "not-a-state-dict", "missing"])
def test_bad_weights_are_a_clear_error(make, expected, dataset, tmp_path, capsys):
    path = make(tmp_path)
    with pytest.raises(UserError) as info:
        load_backbone(str(path))
    message = str(info.value)
    assert expected in message and str(path.resolve()) in message
    assert "\n" not in message

    rc, err = run_cli(dataset, tmp_path / "features", capsys, "--weights", str(path))
    assert rc == 2
    line = error_line(err)
    assert expected in line and str(path.resolve()) in line
    assert not (tmp_path / "features" / "train.h5").exists()


# ---------------------------------------------------------------------------------------------
# --weights imagenet without the internet


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache (torch.hub.get_dir reads TORCH_HOME unless set_dir was called)."""
    home = tmp_path / "torch-home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return home


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def weights_server(saved_alexnet, tmp_path):
    """A loopback HTTP server offering a random AlexNet state_dict under the official file name."""
    folder = tmp_path / "served"
    folder.mkdir()
    os.link(saved_alexnet[0], folder / IMAGENET_FILE)
    requests: list[str] = []
    handler = functools.partial(type("Handler", (_CountingHandler,), {"requests": requests}), directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{IMAGENET_FILE}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_imagenet_weights_offline_name_the_cache_file(torch_home, monkeypatch, dataset, tmp_path, capsys):
    monkeypatch.setattr(family, "weights_url", lambda weights: f"http://127.0.0.1:{closed_port()}/{IMAGENET_FILE}")
    expected_file = torch_home / "hub" / "checkpoints" / IMAGENET_FILE
    assert imagenet_cache_file() == expected_file
    with pytest.raises(UserError) as info:
        load_backbone("imagenet")
    message = str(info.value)
    assert str(expected_file) in message and "--weights PATH" in message
    assert "\n" not in message
    assert not expected_file.exists()

    rc, err = run_cli(dataset, tmp_path / "features", capsys, "--weights", "imagenet")
    assert rc == 2
    line = error_line(err)
    assert str(expected_file) in line and "--weights PATH" in line


def test_imagenet_download_with_the_wrong_hash_is_refused(torch_home, monkeypatch, weights_server):
    url, requests = weights_server
    monkeypatch.setattr(family, "weights_url", lambda weights: url)
    expected_file = torch_home / "hub" / "checkpoints" / IMAGENET_FILE
    with pytest.raises(UserError) as info:
        load_backbone("imagenet")
    message = str(info.value)
    assert requests == [f"/{IMAGENET_FILE}"]  # it did download...
    assert "hash" in message and str(expected_file) in message and "--weights PATH" in message
    assert not expected_file.exists()  # ...and kept nothing that a later run could load unchecked
    assert list(expected_file.parent.iterdir()) == []


def test_imagenet_weights_in_the_hub_cache_load_without_download(torch_home, monkeypatch, weights_server,
                                                                  saved_alexnet):
    url, requests = weights_server
    monkeypatch.setattr(family, "weights_url", lambda weights: url)
    path, model = saved_alexnet
    cached = torch_home / "hub" / "checkpoints" / IMAGENET_FILE
    cached.parent.mkdir(parents=True)
    os.link(path, cached)
    backbone, spec, fingerprint = load_backbone("imagenet")
    assert requests == []  # no download
    assert spec == "imagenet"
    assert_same_weights(backbone, model)
    assert fingerprint == cut_fingerprint(model)


# ---------------------------------------------------------------------------------------------
# --device


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_one_line_error(dataset, tmp_path, capsys):
    rc, err = run_cli(dataset, tmp_path / "features", capsys, "--weights", "random", "--device", "cuda")
    assert rc == 2
    line = error_line(err)
    assert "--device cuda" in line and "CUDA" in line and "--device cpu" in line
    assert not (tmp_path / "features" / "train.h5").exists()
    with pytest.raises(UserError, match="no CUDA device"):
        resolve_device("cuda:0")


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu0", "meta"):
        with pytest.raises(UserError, match="device"):
            resolve_device(bad)


# ---------------------------------------------------------------------------------------------
# The modules


@pytest.fixture
def random_backbone(random0):
    return fc7_of(random0[0])


def random0_model() -> torch.nn.Module:
    return load_backbone("random", seed=0)[0]


def test_fc7_output_is_post_relu_4096_and_always_eval(random_backbone):
    backbone = random_backbone
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        features = backbone(x)
        assert features.shape == (3, FC7_DIM)
        assert (features >= 0).all() and (features > 0).any()
        assert backbone(torch.randn(1, 3, 63, 63)).shape == (1, FC7_DIM)  # the smallest input AlexNet takes

        module = family.features(random0_model(), [family.entry("alexnet").layers["fc7"]])
        module.train()
        assert not module.training and not any(m.training for m in module.modules())
        again, once_more = module(x)["fc7"], module(x)["fc7"]  # dropout stays off
    torch.testing.assert_close(again, features, rtol=0, atol=0)
    torch.testing.assert_close(once_more, features, rtol=0, atol=0)
    assert not any(p.requires_grad for p in module.parameters())

    reference = seeded_alexnet(0).eval()  # and it is AlexNet's own fc7 (the same tensors)
    with torch.no_grad():
        expected = reference.classifier[:6](torch.flatten(reference.avgpool(reference.features(x)), 1))
    torch.testing.assert_close(features, expected)


def test_classifier_is_head_on_backbone(random_backbone):
    torch.manual_seed(1)
    head = LinearHead(5, FC7_DIM)
    torch.nn.init.normal_(head.bias)  # a non-zero bias, so it is not left out unnoticed
    model = LayerClassifier(family.features(random0_model(), [family.entry("alexnet").layers["fc7"]]), "fc7", head)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        expected = head(random_backbone(x))
    assert logits.shape == (2, 5)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    model.train()
    assert not model.backbone.training


def test_weights_file_is_loaded_without_a_random_initialisation(saved_alexnet, tmp_path, monkeypatch):
    """AlexNet is built on the meta device and takes the file's tensors (as float32, as load_state_dict's
    copy made them): no ~1 s random initialisation to throw away, and the same weights and fingerprint."""
    path, model = saved_alexnet
    inits = []
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", lambda *a, **k: inits.append(a) or a[0])
    backbone, _, fingerprint = load_backbone(str(path))
    assert inits and all(tensor.device.type == "meta" for tensor, *_ in inits)  # initialised: nothing, for free
    assert_same_weights(backbone, model)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in backbone.parameters())
    assert fingerprint == cut_fingerprint(model)

    half = tmp_path / "half.pth"  # a file saved in float16 still gives a float32 backbone
    torch.save({k: v.half() for k, v in model.state_dict().items()}, half)
    backbone16, _, _ = load_backbone(str(half))
    assert all(p.dtype == torch.float32 for p in backbone16.parameters())
    torch.testing.assert_close(backbone16.state_dict()["features.0.weight"],
                               model.state_dict()["features.0.weight"].half().float(), rtol=0, atol=0)
