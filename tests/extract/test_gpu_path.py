"""The CUDA path, tested without a GPU: the CUDA and distributed calls patched, the device-side preprocessing
emulated on the CPU, the GPU check's dry run. Tests marked ``gpu`` repeat the essentials on a real GPU."""
from __future__ import annotations

import datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torchvision.transforms.v2 import functional as F

import pipeline.backbones.precision as precision_module
import pipeline.common.preprocess as preprocess_module
import run_extract
from pipeline.backbones.precision import set_precision
from pipeline.extract.devices import DIST_TIMEOUT, HostCopy, start_distributed, warm_up
from pipeline.common.errors import UserError
from pipeline.extract.extractor import BatchReader
from pipeline.common.preprocess import Preprocess
from pipeline.data.synthetic import make_tiny_imagenet
from tests.conftest import error_line, extract_args
from tests.helpers import random_backbone as random_backbone_of



@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_tiny_imagenet(tmp_path_factory.mktemp("gpu") / "ds", num_classes=2, train_per_class=3, val_per_class=1)


# ---------------------------------------------------------------------------------------------
# torchrun: device mapping, set_device, the process group's timeout


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA with ``gpus`` visible devices, and a process group that records its calls (nothing is started)."""
    calls = {"set_device": [], "init": [], "gathered": []}
    state = {"gpus": 1, "uuids": None}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["gpus"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls["set_device"].append(str(device)))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(uuid=f"GPU-{device}"))
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(calls["init"]))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls["init"].append((backend, kw)))
    monkeypatch.setattr(dist, "get_rank", lambda: int(__import__("os").environ.get("RANK", "0")))
    monkeypatch.setattr(dist, "get_world_size", lambda: int(__import__("os").environ.get("WORLD_SIZE", "1")))

    def all_gather_object(out, obj):  # the other ranks' GPUs: distinct unless the test says otherwise
        calls["gathered"].append(obj)
        for i in range(len(out)):
            out[i] = state["uuids"][i] if state["uuids"] else f"{obj}-rank{i}"

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    return calls, state


def torchrun_env(monkeypatch, world: int, rank: int, local_rank: int, local_world: int) -> None:
    for key, value in (("WORLD_SIZE", world), ("RANK", rank), ("LOCAL_RANK", local_rank),
                       ("LOCAL_WORLD_SIZE", local_world)):
        monkeypatch.setenv(key, str(value))


def test_one_visible_gpu_per_process_maps_every_local_rank_to_cuda0(fake_cuda, monkeypatch):
    calls, state = fake_cuda
    torchrun_env(monkeypatch, world=4, rank=3, local_rank=3, local_world=4)  # CUDA_VISIBLE_DEVICES per rank
    assert start_distributed("cuda") == (3, 4, torch.device("cuda:0"))
    assert calls["set_device"] == ["cuda:0"]
    (backend, kwargs), = calls["init"]
    assert backend == "nccl" and kwargs["timeout"] == DIST_TIMEOUT >= datetime.timedelta(minutes=30)


def test_local_rank_picks_its_own_gpu(fake_cuda, monkeypatch):
    calls, state = fake_cuda
    state["gpus"] = 8
    torchrun_env(monkeypatch, world=16, rank=13, local_rank=5, local_world=8)  # node 1 of 2
    assert start_distributed("auto") == (13, 16, torch.device("cuda:5"))
    assert calls["set_device"] == ["cuda:5"]


def test_explicit_gpu_index_with_several_ranks_is_refused(fake_cuda, monkeypatch):
    calls, state = fake_cuda
    state["gpus"] = 2
    torchrun_env(monkeypatch, world=2, rank=1, local_rank=1, local_world=2)
    with pytest.raises(UserError, match="--device cuda:1 names one GPU") as info:
        start_distributed("cuda:1")
    assert "\n" not in str(info.value) and calls["init"] == []


def test_explicit_gpu_index_with_several_ranks_is_one_line_from_the_command(fake_cuda, monkeypatch, dataset,
                                                                           tmp_path, capsys):
    torchrun_env(monkeypatch, world=2, rank=0, local_rank=0, local_world=2)
    rc = run_extract.main([*extract_args(dataset, tmp_path / "out"), "--device", "cuda:0"])
    assert rc == 2
    assert "names one GPU" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "out" / "train.h5").exists()


def test_more_ranks_than_gpus_is_refused(fake_cuda, monkeypatch):
    calls, state = fake_cuda
    state["gpus"] = 2
    torchrun_env(monkeypatch, world=4, rank=3, local_rank=3, local_world=4)
    with pytest.raises(UserError, match="only 2 GPUs are visible"):
        start_distributed("cuda")


def test_ranks_sharing_one_gpu_are_refused(fake_cuda, monkeypatch):
    calls, state = fake_cuda
    state["uuids"] = ["GPU-a", "GPU-a"]  # one GPU visible to both ranks: NCCL would fail with "Duplicate GPU"
    torchrun_env(monkeypatch, world=2, rank=1, local_rank=1, local_world=2)
    with pytest.raises(UserError, match="share one GPU"):
        start_distributed("cuda")


def test_single_process_on_another_gpu_makes_it_current(fake_cuda, monkeypatch):
    """Else the DataLoader's pin-memory thread opens a context on cuda:0."""
    calls, state = fake_cuda
    state["gpus"] = 2
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert start_distributed("cuda:1") == (0, 1, torch.device("cuda:1"))
    assert calls["set_device"] == ["cuda:1"] and calls["init"] == []


def test_cpu_ranks_use_gloo_with_the_long_timeout(fake_cuda, monkeypatch):
    calls, _ = fake_cuda
    torchrun_env(monkeypatch, world=2, rank=1, local_rank=1, local_world=2)
    assert start_distributed("cpu") == (1, 2, torch.device("cpu"))
    assert calls["set_device"] == [] and calls["init"] == [("gloo", {"timeout": DIST_TIMEOUT})]
    assert calls["gathered"] == []


# ---------------------------------------------------------------------------------------------
# Precision: one set of math flags for extraction and live


@pytest.fixture
def tf32_flags():
    """The two TF32 flags, restored after the test (torch.backends.cuda.matmul is not monkeypatch-able)."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_fp32_on_cuda_turns_tf32_off_and_low_precision_leaves_the_flags(tf32_flags):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    set_precision(torch.device("cpu"), "fp32")
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    set_precision(torch.device("cuda"), "bf16")
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    set_precision(torch.device("cuda:0"), "fp32")
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_extraction_and_live_set_the_precision_the_same_way(dataset, tmp_path, monkeypatch, tf32_flags):
    """Both place the backbone with place_backbone, which calls set_precision: the same flags afterwards."""
    from pipeline.live import torch_classifier
    from pipeline.common.checkpoint import make_checkpoint

    seen = []
    real = precision_module.set_precision
    monkeypatch.setattr(precision_module, "set_precision", lambda device, precision: (
        seen.append((device.type, precision)), real(device, precision))[-1])
    out = tmp_path / "features"
    assert run_extract.main(extract_args(dataset, out)) == 0
    flags_after_extraction = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    from features.cache import open_split

    attrs = dict(open_split(out / "train.h5").attrs)
    assert attrs["precision"] == "fp32"  # the default, resolved for the CPU, is what the cache records
    checkpoint = make_checkpoint({"weight": torch.zeros(2, 4096), "bias": torch.zeros(2)}, metrics={}, epoch=0,
                                 cache_attrs=attrs, wnids=["a", "b"], names=["a", "b"], config={})
    torch_classifier.build_classifier(checkpoint, device="cpu")
    assert seen == [("cpu", "fp32"), ("cpu", "fp32")]
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == flags_after_extraction


# ---------------------------------------------------------------------------------------------
# Preprocessing on the device


def reference_normalize(images: torch.Tensor, p: Preprocess) -> torch.Tensor:
    """What normalize() computed before its constants were cached: the CPU cache's bits."""
    mean = torch.tensor(p.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(p.std).view(1, 3, 1, 1) * 255
    return images.to(dtype=torch.float32, memory_format=torch.channels_last).sub_(mean).div_(std)


def test_normalisation_constants_are_made_once_per_device(monkeypatch):
    p = Preprocess(image_size=64, resize_size=72)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    p.normalize(images)
    made = []
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: (made.append(a), real_tensor(*a, **k))[-1])
    for _ in range(3):
        out = p.normalize(images)
    assert made == []  # no host-to-device copy per batch
    assert torch.equal(out, reference_normalize(images, p))  # bit for bit what the CPU cache holds
    assert preprocess_module._row_constants(p.mean, p.std, 64, 64)[0] is \
        preprocess_module._row_constants(p.mean, p.std, 64, 64)[0]


def test_normalising_into_reused_buffers_keeps_every_bit():
    """Extraction on the CPU normalises each batch into the same buffers: any batch size (a shard's last batch
    is smaller), layout or dtype gives the reference's bits, and no buffer is allocated once they are made."""
    p = Preprocess(image_size=64, resize_size=72)
    reuse: dict = {}
    first = p.normalize(torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8), reuse=reuse)
    buffer = reuse[torch.float32]
    for batch, layout in ((4, torch.channels_last), (3, torch.contiguous_format), (1, torch.channels_last)):
        images = torch.randint(0, 256, (batch, 3, 64, 64), dtype=torch.uint8).contiguous(memory_format=layout)
        out = p.normalize(images, reuse=reuse)
        assert torch.equal(out, reference_normalize(images, p)) and out.is_contiguous(memory_format=torch.channels_last)
        assert out.data_ptr() == buffer.data_ptr() and reuse[torch.float32] is buffer
        low = p.normalize(images, torch.bfloat16, reuse=reuse)
        assert torch.equal(low, reference_normalize(images, p).to(torch.bfloat16)) and low.dtype == torch.bfloat16
    assert first.data_ptr() == buffer.data_ptr()  # overwritten by the next call, as documented


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_pixel_value_rounds_to_what_dividing_into_the_narrow_dtype_gave(dtype):
    """The CPU path divides in float32 and then rounds with a copy (3.5x faster for bf16); every one of the 256
    values of every channel gives the bits of the former single step, a float32 division written into a bf16 or
    fp16 output, which earlier caches hold."""
    p = Preprocess(image_size=16, resize_size=16)
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16).clone()
    values[1] = values[1].flip(-1)  # a second image, so batch rows are covered too
    shifted = values.to(dtype=torch.float32, memory_format=torch.channels_last) - torch.tensor(p.mean).view(1, 3, 1, 1) * 255
    former = torch.div(shifted, torch.tensor(p.std).view(1, 3, 1, 1) * 255,
                       out=torch.empty(values.shape, dtype=dtype).contiguous(memory_format=torch.channels_last))
    for reuse in (None, {}):
        low = p.normalize(values, dtype, reuse=reuse)
        assert low.dtype == dtype and torch.equal(low.view(torch.int16), former.view(torch.int16))


def test_normalising_into_the_compute_dtype_equals_the_backbone_cast():
    p = Preprocess()
    images = p.resize_crop(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    low = p.normalize(images, torch.bfloat16)
    assert low.dtype == torch.bfloat16 and low.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(low, p.normalize(images).to(torch.bfloat16))


def test_antialias_does_nothing_for_an_upscale():
    """torchvision's bilinear antialias filter, on an upscale, is the plain bilinear filter: the device path
    skips it for 64 -> 256 (on CUDA the antialias kernel also copies to contiguous and back)."""
    x = torch.rand(2, 3, 64, 64) * 255
    torch.testing.assert_close(F.resize(x, [256], antialias=True), F.resize(x, [256], antialias=False), rtol=0, atol=1e-4)


@pytest.mark.parametrize("size", [(64, 64), (300, 500)], ids=["upscale-64", "downscale-300x500"])
def test_float_resize_path_is_the_uint8_path_within_rounding(size, random_backbone):
    """The CUDA path (resize in float32, rounded; emulated here on the CPU) moves pixels by at most 1 and
    keeps fc7 at cosine >= 0.9999 to the CPU's uint8 path (the cache's)."""
    p = Preprocess()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, *size), dtype=torch.uint8, generator=generator)
    images = F.gaussian_blur(images, [5, 5])  # photo-like: neighbouring pixels correlate
    cpu, device_path = p.resize_crop(images).float(), p.resize_crop_float(images)
    assert device_path.shape == cpu.shape == (3, 3, 224, 224)
    assert (cpu - device_path).abs().max() <= 1  # a downscale without antialias would be far off
    x_cpu, x_dev = p(images), p(images, float_resize=True)
    assert x_dev.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        cosine = torch.nn.functional.cosine_similarity(random_backbone(x_cpu), random_backbone(x_dev), dim=1)
    assert cosine.min() >= 0.9999, cosine
    # a list of mixed sizes takes the same path image by image
    assert torch.equal(p([images[0], images[1]], float_resize=True), x_dev[:2])


@pytest.fixture(scope="module")
def random_backbone():
    module = random_backbone_of("alexnet").module
    return lambda x: module(x)["fc7"]  # (B, 4096) fc7


# ---------------------------------------------------------------------------------------------
# The DataLoader's batches can be pinned; results come back without a blocking copy


def pinnable(value) -> bool:
    """What DataLoader(pin_memory=True) handles: tensors, containers of them, and plain values it passes through."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and pinnable(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(pinnable(v) for v in value)
    return value is None or isinstance(value, (torch.Tensor, np.ndarray, int, float, str))


def test_batches_survive_pin_memory(dataset, monkeypatch):
    from pipeline.datasets.dataset import index_dataset
    from pipeline.datasets.images import read_rgb

    index = index_dataset(dataset)
    paths = list(index.splits["train"].paths)
    big = dataset / "odd-size.JPEG"
    from PIL import Image

    Image.fromarray(np.zeros((80, 96, 3), np.uint8)).save(big)
    (dataset / "broken.JPEG").write_bytes(b"not a jpeg")
    paths += ["odd-size.JPEG", "broken.JPEG"]
    n = len(index.splits["train"].paths)
    batches = [(0, np.arange(0, n)), (1, np.array([0, n])), (2, np.array([n + 1]))]
    reader = BatchReader(dataset, paths, batches, None)  # the device path: workers only decode
    items = [reader[i] for i in range(3)]
    assert isinstance(items[0]["images"], torch.Tensor) and isinstance(items[1]["images"], list)
    assert items[2]["images"] is None and items[2]["skipped"]
    assert torch.equal(items[0]["images"][0], read_rgb(dataset / paths[0]))
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = []
    if not torch.cuda.is_available():  # pinning needs an accelerator: record what would be pinned
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: (pinned.append(self.shape), self)[-1])
    for item in items:
        assert pinnable(item)
        out = pin_memory(item)
        assert set(out) == set(item) and type(out["images"]) is type(item["images"])
        assert out["skipped"] == item["skipped"] and np.array_equal(out["positions"], item["positions"])
    if pinned:
        assert pinned[0] == items[0]["images"].shape and len(pinned) == 1 + 2  # the batch, then the list's two images


def test_host_copy_on_the_cpu_is_the_tensor_itself():
    t = torch.arange(6.0).view(2, 3)
    copy = HostCopy(t)
    assert copy.event is None and np.array_equal(copy.numpy(), t.numpy())


def test_warm_up_runs_nothing_on_the_cpu():
    def fail(*args):
        raise AssertionError("no warm-up forward on the CPU")

    warm_up(fail, Preprocess(), torch.device("cpu"), 64)


@pytest.mark.gpu
def test_host_copy_and_preprocessing_on_cuda(random_backbone):
    device = torch.device("cuda")
    copy = HostCopy(torch.arange(12.0, device=device).view(3, 4))
    assert copy.host.is_pinned() and np.array_equal(copy.numpy(), np.arange(12.0).reshape(3, 4))
    p = Preprocess()
    images = F.gaussian_blur(torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8), [5, 5])
    on_gpu = p(images.to(device)).cpu()
    emulated = p(images, float_resize=True)  # what CUDA computes, up to a rounding step at .5 now and then
    step = 1 / (255 * min(p.std))  # one uint8 level, normalised
    assert (on_gpu - emulated).abs().max() <= step + 1e-4 and (on_gpu != emulated).float().mean() < 0.01
    with torch.inference_mode():
        cosine = torch.nn.functional.cosine_similarity(random_backbone(on_gpu), random_backbone(p(images)), dim=1)
    assert cosine.min() >= 0.9999
