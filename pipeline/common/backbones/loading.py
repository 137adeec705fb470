"""Building the frozen AlexNet fc7 backbone from a weights spec: imagenet, a file, or random."""
from __future__ import annotations

import datetime
import logging
import os
import pickle
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
from torchvision.models import AlexNet_Weights

from models import AlexNetLayers, weights_fingerprint
from pipeline.common.errors import UserError, first_line
from pipeline.common.hardware import resolve_device  # noqa: F401 - re-exported: where callers have always found it
from pipeline.common.backbones.weights import describe_weights, is_enum_spec

log = logging.getLogger(__name__)

IMAGENET_WEIGHTS = AlexNet_Weights.IMAGENET1K_V1
IMAGENET_URL = IMAGENET_WEIGHTS.url  # module-level so tests can point it at a loopback server
# how long ranks wait for each other: rank 0 may download, unpack and index the dataset before the first
# collective (NCCL's own default is 10 minutes); FC7_DIST_TIMEOUT_MIN overrides it
DIST_TIMEOUT = datetime.timedelta(minutes=float(os.environ.get("FC7_DIST_TIMEOUT_MIN", "60")))


def imagenet_cache_file() -> Path:
    """Where torchvision keeps the downloaded ImageNet AlexNet weights (the torch hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(IMAGENET_URL)


def _imagenet_state_dict() -> dict:
    cached = imagenet_cache_file()
    try:
        # the torchvision weights API: loads the hub cache, or downloads into it and checks the hash
        return torch.hub.load_state_dict_from_url(IMAGENET_URL, map_location="cpu", progress=True,
                                                  check_hash=True, weights_only=True)
    except Exception as err:
        reason = first_line(err)
        raise UserError(f"ImageNet AlexNet weights are not in {cached} and could not be downloaded ({reason}); "
                        f"copy {cached.name} there, or pass --weights PATH to a local copy") from None


def load_refusal(err: BaseException) -> str:
    """What torch's weights-only loader refused, in its own words, without its advice to load unsafely."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    found = [line for line in lines if "weights_only" not in line and "Weights only load failed" not in line
             and "documentation" not in line]
    return found[0].rstrip(".") if found else "an object that is not a tensor"


def _file_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"weights file not found: {path}; pass --weights imagenet, random, or an existing .pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's message advises weights_only=False: never passed on
        if "GLOBAL" in str(err):
            raise UserError(f"{path} holds pickled objects besides tensors ({load_refusal(err)}), and is refused "
                            "for safety; pass a plain state_dict of torchvision's AlexNet, such as "
                            "alexnet-owt-7be5be79.pth") from None
        raise UserError(f"{path} is not a readable PyTorch weights file ({load_refusal(err)}); "
                        "pass a state_dict of torchvision's AlexNet, such as alexnet-owt-7be5be79.pth") from None
    except Exception as err:  # an empty file raises EOFError with no message
        reason = first_line(err)
        raise UserError(f"{path} is not a readable PyTorch weights file ({reason}); "
                        "pass a state_dict of torchvision's AlexNet, such as alexnet-owt-7be5be79.pth") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state_dict of tensors; pass a state_dict of torchvision's AlexNet")
    return state


def load_backbone(spec: str, *, seed: int = 0) -> tuple[AlexNetLayers, str, str]:
    """(backbone in eval mode on the CPU, recorded weights spec, weights fingerprint).

    ``spec`` is 'imagenet', 'random' (exactly ``torch.manual_seed(seed); alexnet(weights=None)``),
    a recorded 'random:seed=S' / 'file:PATH', or a path to a torchvision AlexNet state_dict.
    """
    recorded = describe_weights(spec, seed)
    if is_enum_spec(recorded):  # an exact torchvision enum: AlexNet has one
        if recorded != f"{type(IMAGENET_WEIGHTS).__name__}.{IMAGENET_WEIGHTS.name}":
            raise UserError(f"weights {recorded} are not AlexNet's; pass imagenet (AlexNet_Weights.IMAGENET1K_V1), "
                            "random, or a state_dict file of torchvision's AlexNet")
        recorded = "imagenet"
    if recorded.startswith("random:"):
        seed = int(recorded.split("=", 1)[1])
        torch.manual_seed(seed)
        alexnet = torchvision.models.alexnet(weights=None)
        log.warning("backbone has RANDOM weights (seed %d): features are not ImageNet features", seed)
    else:
        state = _imagenet_state_dict() if recorded == "imagenet" else _file_state_dict(Path(recorded[5:]))
        with torch.device("meta"):  # no random initialisation to throw away (~1 s of start-up on 2 cores)
            alexnet = torchvision.models.alexnet(weights=None)
        source = "the ImageNet weights" if recorded == "imagenet" else recorded[5:]
        expected = alexnet.state_dict()
        wrong = sorted(set(expected) ^ set(state)) or [k for k in expected if state[k].shape != expected[k].shape]
        if wrong:
            raise UserError(f"{source} do not fit torchvision's AlexNet (keys or shapes differ: {', '.join(wrong[:3])}); "
                            "pass a state_dict of torchvision.models.alexnet")
        # the file's tensors become the parameters, as float32 as load_state_dict's copy would make them
        alexnet.load_state_dict({k: v.to(expected[k].dtype).contiguous() for k, v in state.items()}, assign=True)
    backbone = AlexNetLayers(alexnet)
    return backbone, recorded, weights_fingerprint(backbone)


def start_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) for --device ``device_name``, under torchrun or not.

    Under several ranks, ``auto``/``cuda`` give each rank one visible GPU: cuda:(LOCAL_RANK mod the visible
    count), so one GPU per process (CUDA_VISIBLE_DEVICES set per rank) works too; an explicit cuda:N is
    refused, as every rank would use that one GPU. The CUDA device is made current in every case: NCCL and
    the DataLoader's pin-memory thread use the current device, which is otherwise cuda:0.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device_name.startswith("cuda:"):
        raise UserError(f"--device {device_name} names one GPU, but torchrun started {world} ranks, which would all "
                        "use it; pass --device cuda (each rank takes its own GPU), or narrow CUDA_VISIBLE_DEVICES")
    if world > 1 and device_name in ("auto", "cuda") and torch.cuda.is_available():
        local_rank, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if visible > 1 and local_world > visible:
            raise UserError(f"torchrun started {local_world} ranks on this node but only {visible} GPUs are visible; "
                            f"pass --nproc_per_node={visible} or fewer")
        device_name = f"cuda:{local_rank % visible}"
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world <= 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DIST_TIMEOUT)
    if device.type == "cuda":  # one visible GPU per process is only right if the processes see different GPUs
        gpus: list = [None] * dist.get_world_size()
        dist.all_gather_object(gpus, str(torch.cuda.get_device_properties(device).uuid))
        if len(set(gpus)) < len(gpus):
            raise UserError(f"several torchrun ranks share one GPU ({len(set(gpus))} GPUs for {len(gpus)} ranks); "
                            "start at most one rank per GPU (--nproc_per_node), or give each its own CUDA_VISIBLE_DEVICES")
    return dist.get_rank(), dist.get_world_size(), device


def compute_dtype(precision: str) -> torch.dtype:
    """The backbone's compute dtype for a precision name (see pipeline.common.names.PRECISIONS)."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def set_precision(device: torch.device, precision: str) -> None:
    """The one place that sets the math flags for a precision, for extraction and live alike.

    fp32 means fp32: no TF32 convolutions or matmuls on CUDA (cuDNN's TF32 is on by default); bf16 and
    fp16 leave the flags as they are, since their convolutions never use TF32.
    """
    if device.type == "cuda" and precision == "fp32":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def place_backbone(backbone: AlexNetLayers, device: torch.device, precision: str) -> AlexNetLayers:
    """The backbone on ``device`` in channels_last, its weights cast once to the precision's dtype."""
    set_precision(device, precision)
    return backbone.to(device=device, dtype=compute_dtype(precision), memory_format=torch.channels_last)


@torch.inference_mode()
def warm_up(backbone: AlexNetLayers, preprocess, device: torch.device, batch_size: int) -> None:
    """On CUDA, one untimed forward of a full batch: cuDNN's and cuBLAS's start-up (and the caching
    allocator's first blocks) then happen before the timed loop. Nothing to warm on the CPU."""
    if device.type != "cuda":
        return
    images = torch.zeros(batch_size, 3, 64, 64, dtype=torch.uint8, device=device)
    backbone(preprocess(images, backbone.dtype))
    torch.cuda.synchronize(device)


class HostCopy:
    """A device tensor copied into pinned host memory without waiting; ``numpy()`` waits for it to land.

    On CUDA the copy is queued behind the forward (non_blocking) and an event marks its end, so the main
    thread goes on to the next batch; on the CPU the tensor is its own copy.
    """

    def __init__(self, tensor: torch.Tensor):
        self.event = None
        if tensor.device.type == "cpu":
            self.host = tensor
            return
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.host.copy_(tensor, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def numpy(self):
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()
