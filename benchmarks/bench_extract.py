"""Extraction and head-training speed, measured side by side in one run on the same images.

    python benchmarks/bench_extract.py                       # the 10-class subset if found, else generated JPEGs
    python benchmarks/bench_extract.py --images 256 --head-rows 100000

(a) the plain pipeline: ImageFolder-style PIL decode + Resize/CenterCrop/ToTensor/Normalize, a DataLoader,
    fp32 AlexNet (NCHW), fc7 = classifier[:6];
(b) the project's extraction (pipeline.extract) in fp32 and bf16 (fp16 too on CUDA);
(c) the limit: the bare fc7 forward on ready-made input tensors, same precision, batch and memory format;
(d) head epochs: the project's trainer against a bare SGD loop on an in-memory tensor;
(e) the 20-epoch job: extract once + 20 head epochs, against running the frozen backbone every epoch.
Writes benchmarks/results/extract.json and extract.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms  # noqa: E402

from features.cache import open_split  # noqa: E402
from pipeline.config import ExtractConfig  # noqa: E402
from pipeline.extract import extract  # noqa: E402
from models import AlexNetFC7  # noqa: E402
from pipeline.dataset import index_dataset  # noqa: E402
from pipeline.prepare import resolve_data  # noqa: E402
from pipeline.preprocess import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from pipeline.synthetic import make_tiny_imagenet  # noqa: E402
from pipeline.train_head import InMemoryFeatures, Recipe, Standardizer, fit_head  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MINI = Path(os.environ.get("TINY_IMAGENET_MINI", ROOT.parent / "shared" / "data" / "tiny-imagenet-mini.zip"))
EPOCHS = 20


class PlainImages(Dataset):
    """What one writes by hand: PIL per sample, torchvision transforms per sample."""

    def __init__(self, root: Path, paths: list[str], labels: list[int]):
        self.root, self.paths, self.labels = root, paths, labels
        self.transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.root / self.paths[i]) as image:
            return self.transform(image.convert("RGB")), self.labels[i]


def plain_fc7(alexnet) -> torch.nn.Module:
    return torch.nn.Sequential(alexnet.features, alexnet.avgpool, torch.nn.Flatten(), alexnet.classifier[:6]).eval()


def time_plain_pass(model, loader, device, head=None, optimizer=None) -> tuple[float, int]:
    """One pass of the plain pipeline; with a head, one plain training epoch (backbone in the loop)."""
    start, n = time.perf_counter(), 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            fc7 = model(x)
        if head is not None:
            loss = torch.nn.functional.cross_entropy(head(fc7), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        n += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, n


def time_bare_forward(backbone, batch_size, device, dtype, batches=4) -> float:
    """Images/s of the fc7 forward alone on a ready channels_last tensor."""
    x = torch.randn(batch_size, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    with torch.inference_mode(), autocast:
        backbone(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            backbone(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batches * batch_size / (time.perf_counter() - start)


def time_head_epochs(rows: int, num_classes: int, device, epochs: int = 2) -> dict:
    """Seconds per epoch: the project's trainer vs a bare SGD loop over an in-memory tensor."""
    g = torch.Generator().manual_seed(0)
    features = torch.rand(rows, 4096, generator=g).to(device)
    labels = torch.randint(0, num_classes, (rows,), generator=g).to(device)
    source = InMemoryFeatures(features, labels)
    # bare loop: the minimum work of an epoch (shuffle, index, forward, backward, step)
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
        if device.type == "cuda":
            torch.cuda.synchronize()
        bare.append(time.perf_counter() - start)
    val = InMemoryFeatures(features[:1000], labels[:1000])
    result = fit_head(source, val, Recipe(epochs=epochs), Standardizer.fit(source, device), num_classes=num_classes,
                      device=device, progress=False)
    project = [h["train_seconds"] for h in result.history]
    return {"rows": rows, "bare_epoch_s": min(bare), "project_epoch_s": min(project),
            "ratio_project_over_bare": min(project) / min(bare)}


def dataset_root(tmp: Path, images: int) -> Path:
    if MINI.is_file():
        return resolve_data(MINI)
    per_class = max(1, images // 10)
    return make_tiny_imagenet(tmp / "generated", num_classes=10, train_per_class=per_class, val_per_class=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000, help="train images to time (a prefix of the train split)")
    p.add_argument("--bf16-images", type=int, default=256, help="images for the reduced-precision runs (slow on CPUs without bf16 units)")
    p.add_argument("--head-rows", type=int, default=100_000, help="rows for the head-epoch benchmark (d)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers for both pipelines")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    batch = args.batch_size or (256 if device.type == "cuda" else 64)
    workers = args.workers if args.workers is not None else (8 if device.type == "cuda" else 1)
    results = {"bf16_images": args.bf16_images, "device": str(device), "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "batch_size": batch, "workers": workers}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        full = index_dataset(dataset_root(tmp, args.images))
        # a dataset holding the first N train images (and a few val) so both pipelines read the same files
        paths, labels = full.splits["train"].paths[:args.images], full.splits["train"].labels[:args.images]
        subset = make_subset(full, paths, tmp / "subset")
        n = len(paths)
        results["images"] = n
        print(f"{n} images from {full.root}, device {device}, batch {batch}, workers {workers}", flush=True)

        torch.manual_seed(0)
        alexnet = torchvision.models.alexnet(weights=None)
        # (a) plain pipeline
        model = plain_fc7(alexnet).to(device)
        loader = DataLoader(PlainImages(full.root, paths, labels), batch_size=batch, num_workers=workers)
        warm = DataLoader(PlainImages(full.root, paths[:batch], labels[:batch]), batch_size=batch, num_workers=0)
        time_plain_pass(model, warm, device)  # warm-up: page cache, oneDNN primitives
        seconds, _ = time_plain_pass(model, loader, device)
        results["plain_img_s"] = n / seconds
        print(f"(a) plain pipeline             {n / seconds:8.1f} img/s", flush=True)

        # (b) + (c) the project, and the bare forward at the same settings
        precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
        features = {}
        backbone = AlexNetFC7(alexnet).to(device, memory_format=torch.channels_last)
        small = make_subset(full, paths[:args.bf16_images], tmp / "subset-small")
        for precision in precisions:
            out = tmp / f"cache-{precision}"
            config = ExtractConfig(data=str(subset if precision == "fp32" else small), out=out, weights="random", seed=0,
                                   device=str(device), precision=precision, batch_size=batch, workers=workers,
                                   splits=("train",), progress=False)
            summary = extract(config).splits["train"]
            results[f"project_{precision}_img_s"] = summary.images_per_s
            dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
            results[f"bare_{precision}_img_s"] = time_bare_forward(backbone, batch, device, dtype)
            features[precision] = open_split(out / "train.h5").read_features()
            print(f"(b) project {precision:5s}             {summary.images_per_s:8.1f} img/s", flush=True)
            print(f"(c) bare forward {precision:5s}        {results[f'bare_{precision}_img_s']:8.1f} img/s", flush=True)
        f32 = torch.from_numpy(features["fp32"])
        for precision in precisions[1:]:
            low = torch.from_numpy(features[precision]).float()
            cos = torch.nn.functional.cosine_similarity(low, f32[:len(low)], dim=1)
            results[f"{precision}_cosine_min"] = cos.min().item()
        # fidelity of the fp32 default against the plain reference
        with torch.inference_mode():
            reference = torch.cat([model(x.to(device)).cpu() for x, _ in loader])
        results["fp32_cosine_vs_plain_min"] = torch.nn.functional.cosine_similarity(reference, f32, dim=1).min().item()

        # (d) head epochs
        head = time_head_epochs(args.head_rows, 200, device)
        results["head"] = head
        print(f"(d) head epoch on {head['rows']} rows: project {head['project_epoch_s']:.2f} s, bare loop "
              f"{head['bare_epoch_s']:.2f} s", flush=True)

        # (e) the whole job on these n images: extract once + 20 head epochs vs 20 plain epochs
        head_model = torch.nn.Linear(4096, full.num_classes).to(device)
        optimizer = torch.optim.SGD(head_model.parameters(), lr=0.001, momentum=0.9)
        plain_loader = DataLoader(PlainImages(full.root, paths, labels), batch_size=100, num_workers=workers, shuffle=True)
        plain_epoch, _ = time_plain_pass(model, plain_loader, device, head_model, optimizer)
        cache = InMemoryFeatures(torch.from_numpy(features["fp32"]), torch.tensor(labels))
        start = time.perf_counter()
        fit_head(cache, cache, Recipe(epochs=EPOCHS), Standardizer.fit(cache, device), num_classes=full.num_classes,
                 device=device, progress=False)
        head_job = time.perf_counter() - start
        extract_seconds = n / results["project_fp32_img_s"]
        results["job"] = {"plain_20_epochs_s": EPOCHS * plain_epoch, "project_extract_s": extract_seconds,
                          "project_20_head_epochs_s": head_job,
                          "speedup": EPOCHS * plain_epoch / (extract_seconds + head_job)}

    ratios = {
        "project_fp32_over_plain": results["project_fp32_img_s"] / results["plain_img_s"],
        "project_bf16_over_plain": results["project_bf16_img_s"] / results["plain_img_s"],
        "project_fp32_over_bare_fp32": results["project_fp32_img_s"] / results["bare_fp32_img_s"],
        "project_bf16_over_bare_bf16": results["project_bf16_img_s"] / results["bare_bf16_img_s"],
        "head_epoch_over_bare": results["head"]["ratio_project_over_bare"],
        "job_speedup_20_epochs": results["job"]["speedup"],
    }
    results["ratios"] = ratios
    print("\nratios")
    for key, value in ratios.items():
        print(f"  {key:32s} {value:6.2f}")
    print(f"  bf16 cosine to fp32 (min row)    {results['bf16_cosine_min']:.5f}")
    print(f"  fp32 cosine to plain (min row)   {results['fp32_cosine_vs_plain_min']:.6f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "extract.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "extract.png")
    print(f"wrote {RESULTS / 'extract.json'} and {RESULTS / 'extract.png'}")
    return 0


def make_subset(full, paths: list[str], root: Path) -> Path:
    """A dataset in the official layout whose train split is exactly ``paths`` (symlinks, nothing copied)."""
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(full.wnids) + "\n")
    (root / "words.txt").write_text("\n".join(f"{w}\t{n}" for w, n in zip(full.wnids, full.full_names)) + "\n")
    for wnid in full.wnids:
        (root / "train" / wnid / "images").mkdir(parents=True)
    for path in paths:
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(full.root / path)
    val = root / "val" / full.wnids[0] / "images"
    val.mkdir(parents=True)
    (val / "v.JPEG").symlink_to(full.root / paths[0])
    return root


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["plain fp32"] + [f"project {p}" for p in ("fp32", "bf16", "fp16") if f"project_{p}_img_s" in results] \
        + [f"bare {p}" for p in ("fp32", "bf16", "fp16") if f"bare_{p}_img_s" in results]
    keys = ["plain_img_s"] + [f"project_{p}_img_s" for p in ("fp32", "bf16", "fp16") if f"project_{p}_img_s" in results] \
        + [f"bare_{p}_img_s" for p in ("fp32", "bf16", "fp16") if f"bare_{p}_img_s" in results]
    fig, ax = plt.subplots(figsize=(8, 4))
    colors = {"plain": "#999", "project": "#2a7", "bare": "#36c"}
    bars = ax.bar(labels, [results[k] for k in keys], color=[colors[label.split()[0]] for label in labels])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("images / s")
    ax.set_title(f"fc7 extraction on {results['device']} ({results['images']} images, batch {results['batch_size']}); "
                 f"20-epoch job {results['job']['speedup']:.0f}x faster", fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
