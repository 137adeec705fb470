"""What the two zoo families (timm_family, open_clip_family) share: their weights' local files, state_dict files
of an architecture, each layer's width, and the batch size from a model's cost.

Pretrained weights are read through the family's own loader from its usual local cache: Hugging Face's
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``) for nearly all, a download folder for
the few known only by URL. A file not there is downloaded when there is a network; when there is none, or
HF_HUB_OFFLINE=1, that is one line naming the file and ``--weights FILE``: never a fallback to random weights.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from models.backbones import weights_fingerprint
from pipeline.backbones.catalog import Loaded, batch_size_for
from pipeline.backbones.weights import describe_weights, hf_cache_dir, hf_offline, load_state_dict
from pipeline.common.errors import UserError, first_line
from pipeline.common.hardware import available_memory

log = logging.getLogger(__name__)

FILE_KINDS = ".safetensors, .bin or .pth"


def _missing(what: str, where: str, why: str, filename: str) -> UserError:
    """The one line for pretrained weights that are neither in the local cache nor downloadable."""
    return UserError(f"{what} pretrained weights are not in {where} and could not be downloaded ({why}); copy "
                     f"{filename} there where a network is (a copy of that cache folder will do), or pass --weights "
                     f"/path/to/{filename} ({FILE_KINDS})")


def hub_weights(repo: str, filenames: list[str], what: str, *, revision: str | None = None) -> Path:
    """The local path of the first of ``filenames`` that Hugging Face repo ``repo`` holds: from the cache, else
    downloaded into it (one line when offline or unreachable, without huggingface_hub's retries and their log)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    cache = hf_cache_dir()
    for filename in filenames:
        found = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision)
        if isinstance(found, str):
            return Path(found)
    where = f"the Hugging Face cache {cache / ('models--' + repo.replace('/', '--'))}"
    unreachable = "HF_HUB_OFFLINE=1" if hf_offline() else _no_route()
    if unreachable:
        raise _missing(what, where, unreachable, filenames[0])
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry chatter is not the user's line
    try:
        for filename in filenames:
            try:
                return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache))
            except LocalEntryNotFoundError as err:  # (a subclass of the next) the hub could not be reached
                raise _missing(what, where, first_line(err), filenames[0]) from None
            except EntryNotFoundError:  # the repo is reachable and has another of the names
                continue
            except Exception as err:  # a proxy refusing, a repo that moved
                raise _missing(what, where, first_line(err), filenames[0]) from None
    finally:
        hub_log.setLevel(level)
    raise UserError(f"{what}: Hugging Face repo {repo} holds none of {', '.join(filenames)}; pass --weights FILE "
                    f"({FILE_KINDS})")


def _no_route() -> str | None:
    """Why the hub cannot be reached, found at once (its host does not resolve), else None: without this a machine
    with no network waits through huggingface_hub's retries (about 23 s a file). Through a proxy, not checked."""
    import socket
    from urllib.parse import urlparse

    if any(os.getenv(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urlparse(os.getenv("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as err:
        return f"no network: {host} does not resolve ({err.strerror or err})"
    return None


def url_weights(url: str, folder: Path, what: str, *, progress: bool = True) -> Path:
    """The local copy of weights known only by URL: ``folder/<basename>``, downloaded there when missing."""
    path = folder / url.rsplit("/", 1)[-1]
    if path.is_file():
        return path
    if hf_offline():
        raise _missing(what, str(folder), "HF_HUB_OFFLINE=1", path.name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=progress)
    except Exception as err:
        raise _missing(what, str(folder), first_line(err), path.name) from None
    return path


def load_matching(model: nn.Module, path: Path, what: str) -> nn.Module:
    """``model`` with a state_dict file's tensors; a file of another architecture is one line naming its first
    mismatched key (missing, unexpected, or of another shape)."""
    state = load_state_dict(path, what)
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            problem = f"{key!r} is missing"
            break
        if tuple(state[key].shape) != tuple(tensor.shape):
            problem = f"{key!r} is {tuple(state[key].shape)}, not {tuple(tensor.shape)}"
            break
    else:
        extra = [key for key in state if key not in expected]
        if not extra:
            model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
            return model
        problem = f"{extra[0]!r} is not one of its keys"
    raise UserError(f"{path} is not a state_dict of {what}: {problem}; pass the state_dict of that architecture "
                    f"({FILE_KINDS}), or another --backbone")


def other_weights(spec: str, seed: int, build: Callable[[], nn.Module], name: str, what: str) -> tuple[nn.Module, str]:
    """(the model, the spec as recorded) for weights other than pretrained: random (``torch.manual_seed(seed);
    build()``, for tests only, with its warning) or a state_dict file of ``what``; anything else is one line."""
    recorded = describe_weights(spec, seed)
    if recorded.startswith("random:"):
        torch.manual_seed(int(recorded.split("=", 1)[1]))
        model = build()
        log.warning("backbone %s has RANDOM weights (%s): its features are not pretrained features", name, recorded)
        return model, recorded
    if recorded.startswith("file:"):
        return load_matching(build(), Path(recorded[5:]), what), recorded
    raise UserError(f"--weights {spec} is not for {name.split(':', 1)[0]} models; pass pretrained (the tag's weights), "
                    f"random, or a state_dict file ({FILE_KINDS})")


def frozen(model: nn.Module, name: str, recorded: str, enum: str) -> Loaded:
    """The loaded model in eval mode without gradients, and what names its weights (its fingerprint too)."""
    model.requires_grad_(False)
    model.eval()
    return Loaded(model, name, recorded, enum, weights_fingerprint(model))


def gflops(model: nn.Module, run: Callable[[nn.Module, torch.Tensor], object], image_size: int) -> float:
    """Multiply-adds per image, in billions, of ``run(model, x)`` at ``image_size``, counted on the meta device
    (``model`` built there: no weights, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        run(model, torch.zeros(1, 3, image_size, image_size, device="meta"))
    return counter.get_total_flops() / 2e9


def batch_size(count: Callable[[], float], device_type: str, free_bytes: int | None) -> int:
    """The extraction batch from the model's cost (``count()``, GFLOPs per image) and the free memory: the device's
    on CUDA, the host's available memory on the CPU (``catalog.batch_size_for``)."""
    try:
        cost = count()
    except Exception as err:  # an op without a meta kernel: the cost of a mid-sized model
        log.info("could not count the model's FLOPs on the meta device (%s); batch as for 4 GFLOPs", first_line(err))
        cost = 4.0
    if device_type != "cuda" and free_bytes is None:
        free_bytes = available_memory()
    return batch_size_for(cost, device_type, free_bytes)


def widths(module: nn.Module, image_size: int) -> dict[str, int]:
    """Each layer's vector length for one image of ``image_size``: one pass with the module's tensors swapped for
    meta ones (no compute), or one real fp32 image where an op has no meta kernel. A size the model cannot take is
    one line."""
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    meta = {key: torch.empty_like(value, device="meta") for key, value in tensors.items()}
    try:
        with torch.inference_mode():
            outputs = torch.func.functional_call(module, meta, (torch.zeros(1, 3, image_size, image_size, device="meta"),))
    except Exception:
        try:
            with torch.inference_mode():
                outputs = module(torch.zeros(1, 3, image_size, image_size, dtype=module.dtype))
        except Exception as err:
            raise UserError(f"--image-size {image_size} does not fit this backbone ({first_line(err)}); use its own "
                            "size (drop --image-size)") from None
    return {name: int(rows.shape[1]) for name, rows in outputs.items()}
