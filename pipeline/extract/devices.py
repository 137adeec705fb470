"""The extraction's devices: torchrun ranks and their GPUs, CUDA's start-up before the timed loop, and rows
copied back to the host without waiting."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from pipeline.common.errors import UserError
from pipeline.common.hardware import resolve_device

# how long ranks wait for each other: rank 0 may download, unpack and index the dataset before the first
# collective (NCCL's own default is 10 minutes); FC7_DIST_TIMEOUT_MIN overrides it
DIST_TIMEOUT = datetime.timedelta(minutes=float(os.environ.get("FC7_DIST_TIMEOUT_MIN", "60")))


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


@torch.inference_mode()
def warm_up(backbone: torch.nn.Module, preprocess, device: torch.device, batch_size: int) -> None:
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
