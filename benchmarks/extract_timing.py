"""The in-process timings of benchmarks.bench_extract: (c) the bare fc7 forward, (d) head epochs against a bare SGD
loop, and one epoch of the seed's recipe with the backbone in the loop (for (e))."""
from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from pathlib import Path


def time_bare_forward(backbone, batch_size, device, mode: str, batches: int) -> float:
    """Images/s of the fc7 forward alone on a ready channels_last tensor; mode fp32, bf16_cast or bf16_autocast."""
    import torch

    dtype = torch.bfloat16 if mode == "bf16_cast" else torch.float32
    model = copy.deepcopy(backbone).to(dtype=dtype) if mode == "bf16_cast" else backbone
    x = torch.randn(batch_size, 3, 224, 224, device=device).to(dtype=dtype, memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if mode == "bf16_autocast" else nullcontext()
    with torch.inference_mode(), autocast:
        model(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batches * batch_size / (time.perf_counter() - start)


def time_head_epochs(rows: int, num_classes: int, device, epochs: int = 2) -> dict:
    """Seconds per epoch: the project's trainer vs a bare SGD loop over an in-memory tensor."""
    import torch

    from pipeline.heads.linear import Recipe, fit_head
    from pipeline.heads.readers import InMemoryFeatures
    from pipeline.heads.standardize import Standardizer

    g = torch.Generator().manual_seed(0)
    features = torch.rand(rows, 4096, generator=g).to(device)
    labels = torch.randint(0, num_classes, (rows,), generator=g).to(device)
    source = InMemoryFeatures(features, labels)
    head = torch.nn.Linear(4096, num_classes).to(device)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.001, momentum=0.9)
    bare = []
    for _ in range(epochs):
        start = time.perf_counter()
        for idx in torch.randperm(rows, generator=g).to(device).split(100):
            loss = torch.nn.functional.cross_entropy(head(features[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        bare.append(time.perf_counter() - start)
    val = InMemoryFeatures(features[:1000], labels[:1000])
    result = fit_head(source, val, Recipe(epochs=epochs), Standardizer.fit(source, device), num_classes=num_classes,
                      device=device, progress=False)
    project = [h["train_seconds"] for h in result.history]
    return {"rows": rows, "bare_epoch_s": min(bare), "project_epoch_s": min(project),
            "ratio_project_over_bare": min(project) / min(bare)}


def plain_training_epoch_s(root: Path, paths: list[str], labels: list[int], num_classes: int, device) -> float:
    """One epoch of the seed's recipe with the backbone in the loop (PIL transforms, batch 100)."""
    import torch
    import torchvision
    from PIL import Image
    from torchvision import transforms

    from pipeline.common.preprocess import IMAGENET_MEAN, IMAGENET_STD

    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet(weights=None)
    model = torch.nn.Sequential(alexnet.features, alexnet.avgpool, torch.nn.Flatten(), alexnet.classifier[:6]).eval()
    head = torch.nn.Linear(4096, num_classes)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.001, momentum=0.9)
    start = time.perf_counter()
    for i in range(0, len(paths), 100):
        x = torch.stack([transform(Image.open(root / p).convert("RGB")) for p in paths[i:i + 100]])
        with torch.no_grad():
            fc7 = model(x)
        loss = torch.nn.functional.cross_entropy(head(fc7), torch.tensor(labels[i:i + 100]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start
