"""Extraction and head-training speed, measured side by side in one run on the same images.

    python -m benchmarks.bench_extract                       # the 10-class subset if found, else generated JPEGs
    python -m benchmarks.bench_extract --images 320 --skip-head

Whole processes (each its own Python process, start-up included, on the same first N train images):
(a) the plain pipeline: PIL decode + Resize/CenterCrop/ToTensor/Normalize per sample, a DataLoader,
    fp32 AlexNet (NCHW), fc7 = classifier[:6];
(b) the project's extraction (pipeline.extract.extractor) in fp32 and in bf16, with its phases timed: imports,
    indexing, start-up to the first batch (backbone, fingerprint, workers), steady state, assembly;
(b') a bare whole process: import torch and torchvision, build the fc7 cut, forward over ready tensors, as many
    images (issue 21's reference: the project's fp32 whole process should reach >= 0.93x of it).
The limits, in this process on ready-made input tensors at the same batch size:
(c) the bare fc7 forward: fp32 channels_last; bf16 with the weights cast once; bf16 autocast (fp32 weights);
(d) head epochs: the project's trainer against a bare SGD loop on an in-memory tensor;
(e) the 20-epoch job: extract once + 20 head epochs, against running the frozen backbone every epoch.
Fidelity: bf16 cache vs fp32 cache, fp32 cache vs the plain reference (cosine per row, min).
The CPU kind (model, native bf16, torch's capability, flags) is printed and recorded.
Writes benchmarks/results/extract-<cpu tag>.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.extract_feed import whole_process
from benchmarks.extract_report import plot, print_summary, ratios
from benchmarks.extract_timing import plain_training_epoch_s, time_bare_forward, time_head_epochs

STARTED = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MINI = Path(os.environ.get("TINY_IMAGENET_MINI", ROOT.parent / "shared" / "data" / "tiny-imagenet-mini.zip"))  # 10 classes
EPOCHS = 20


# ---------------------------------------------------------------------------------------------
# Children: one whole process each


def child_plain(args) -> dict:
    """The plain pipeline as one writes it by hand; fc7 saved to args.out (.npy)."""
    import numpy as np
    import torch
    import torchvision
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    from pipeline.datasets.dataset import index_dataset
    from pipeline.common.preprocess import IMAGENET_MEAN, IMAGENET_STD

    class PlainImages(Dataset):
        def __init__(self, root, paths):
            self.root, self.paths = root, paths
            self.transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                                 transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            with Image.open(self.root / self.paths[i]) as image:
                return self.transform(image.convert("RGB"))

    dataset = index_dataset(Path(args.data))
    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet(weights=None)
    model = torch.nn.Sequential(alexnet.features, alexnet.avgpool, torch.nn.Flatten(), alexnet.classifier[:6]).eval()
    loader = DataLoader(PlainImages(dataset.root, dataset.splits["train"].paths), batch_size=args.batch_size,
                        num_workers=args.workers)
    with torch.no_grad():
        features = torch.cat([model(x) for x in loader])
    np.save(args.out, features.numpy())
    return {"images": len(features)}


def child_bare(args) -> dict:
    """A bare whole process: import torch and torchvision, build AlexNet's fc7 cut with its weights cast once to the
    precision, run it on --device over as many ready tensors as the dataset has train images (or --bare-images):
    one batch of random input, reused; no decoding, no writing. On CUDA each batch is waited for, so its stamp is
    when the device finished it (fp32 with TF32 off, as the project runs it)."""
    import torch
    import torchvision

    from pipeline.datasets.dataset import index_dataset

    images = args.bare_images or len(index_dataset(Path(args.data)).splits["train"].paths)
    device = torch.device(args.device or "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.precision not in (None, "fp32")
    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet(weights=None).eval()
    model = torch.nn.Sequential(alexnet.features, alexnet.avgpool, torch.nn.Flatten(), alexnet.classifier[:6])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision or "fp32"]
    model = model.to(device=device, dtype=dtype, memory_format=torch.channels_last)  # cast once, as the project does
    x = torch.randn(args.batch_size, 3, 224, 224).to(device=device, dtype=dtype, memory_format=torch.channels_last)
    wait = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    stamps = []  # after each batch, as the project child stamps its batches
    with torch.inference_mode():
        for start in range(0, images, args.batch_size):
            model(x[:min(args.batch_size, images - start)])
            wait()
            stamps.append((time.perf_counter(), min(args.batch_size, images - start)))
    first, last = stamps[0][0], stamps[-1][0]
    steady = sum(n for _, n in stamps[1:]) / (last - first) if last > first else None
    return {"images": images, "steady_img_s": steady, "in_process_s": time.perf_counter() - STARTED}


def child_project(args) -> dict:
    """run_extract's work, through the command it runs (pipeline.commands.extract), with its phases timed; the cache
    goes to args.out. Collection is off while the modules import, as run_extract.py's main has it."""
    import gc

    gc.disable()  # as run_extract.main: pipeline.commands.extract turns it back on once torch is imported
    from features import cache
    from pipeline import commands
    from pipeline.common.config import ExtractConfig
    from pipeline.datasets import dataset as dataset_module
    from pipeline.extract import extractor as extract_module

    t_imports = time.perf_counter()
    stamps, spans = [], {"indexing_s": 0.0, "backbone_load_s": 0.0, "precision_choice_s": 0.0, "assembly_s": 0.0}

    def timed(owner, name, key):
        real = getattr(owner, name)

        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                spans[key] += time.perf_counter() - start
        setattr(owner, name, wrapper)

    timed(dataset_module, "index_dataset", "indexing_s")
    timed(extract_module, "load_for", "backbone_load_s")
    timed(extract_module, "decide_precision", "precision_choice_s")  # auto's measurement
    timed(cache, "assemble", "assembly_s")
    # each batch of the extraction's loop (one forward filling every layer); auto's timing forwards come before
    add = extract_module._Forward.add
    extract_module._Forward.add = lambda self, item, acc: (add(self, item, acc),
                                                          stamps.append((time.perf_counter(), item["count"])))[0]
    config = ExtractConfig(data=args.data, out=Path(args.out), weights="random", seed=0, device=args.device,
                           precision=args.precision, batch_size=args.batch_size, workers=args.workers,
                           splits=("train",), progress=False)
    commands.extract(config)
    t_end = time.perf_counter()
    first, last = stamps[0][0], stamps[-1][0]
    steady_images = sum(n for _, n in stamps[1:])
    return {"images": sum(n for _, n in stamps), "imports_s": t_imports - STARTED,
            "to_first_batch_s": first - t_imports, **spans, "steady_s": last - first,
            "steady_img_s": steady_images / (last - first) if last > first else None,
            "in_process_s": t_end - STARTED}


# ---------------------------------------------------------------------------------------------
# Limits in this process


def make_subset(full, paths: list[str], root: Path) -> Path:
    """A dataset in the official layout whose train split is exactly ``paths`` (symlinks, nothing copied)."""
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(full.wnids) + "\n")
    (root / "words.txt").write_text("\n".join(f"{w}\t{n}" for w, n in zip(full.wnids, full.full_names)) + "\n")
    for wnid in full.wnids:
        (root / "train" / wnid / "images").mkdir(parents=True)
    for path in paths:
        (root / path).symlink_to(full.root / path)
    val = root / "val" / full.wnids[0] / "images"
    val.mkdir(parents=True)
    (val / "v.JPEG").symlink_to(full.root / paths[0])
    return root


def cosine_min(a, b) -> float:
    import torch
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a).double(), torch.as_tensor(b).double(), dim=1).min().item()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=320, help="train images (a prefix of the train split)")
    p.add_argument("--head-rows", type=int, default=100_000, help="rows for the head-epoch benchmark (d)")
    p.add_argument("--skip-head", action="store_true", help="leave out (d) and (e)")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers for both pipelines")
    p.add_argument("--bare-batches", type=int, default=2, help="timed batches per bare forward")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default results/extract-<cpu tag>.json)")
    p.add_argument("--phases", action="store_true",
                   help="only the per-image CPU time of each phase and the fixed cost (benchmarks.extract_phases)")
    p.add_argument("--feed", action="store_true",
                   help="only the data path against the forward: bare and project whole processes, folder and pack, "
                        "alternating rounds (benchmarks.extract_feed)")
    p.add_argument("--timeline", action="store_true",
                   help="only the timeline of one extraction per precision, thread by thread (benchmarks.extract_timeline)")
    p.add_argument("--rounds", type=int, default=3, help="--feed: alternating rounds; medians are reported")
    p.add_argument("--precisions", default="auto,fp32", help="--feed: the precisions compared, comma-separated")
    p.add_argument("--child", choices=("plain", "bare", "project"), help=argparse.SUPPRESS)
    p.add_argument("--data", help="--timeline: a dataset folder or pack to extract (default: --images made as --feed makes them)")
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--bare-images", type=int, default=None, help=argparse.SUPPRESS)
    return p


def pick_images(count: int, tmp: Path):
    """(full dataset, the first ``count`` train paths, their labels, a dataset folder of just those)."""
    from pipeline.datasets.dataset import index_dataset
    from pipeline.data.prepare import resolve_data
    from pipeline.data.synthetic import make_tiny_imagenet

    if MINI.is_file():  # unpacked from a copy: nothing is written beside the shared zip
        shutil.copy(MINI, tmp / MINI.name)
        root = resolve_data(tmp / MINI.name)
    else:
        root = make_tiny_imagenet(tmp / "generated", num_classes=10, train_per_class=max(1, count // 10), val_per_class=1)
    full = index_dataset(root)
    paths, labels = full.splits["train"].paths[:count], full.splits["train"].labels[:count]
    return full, paths, labels, make_subset(full, paths, tmp / "subset")


def measure(args, results: dict, tmp: Path, device, batch: int, workers: int) -> None:
    """(a)-(e) and the fidelity, into ``results``."""
    import numpy as np
    import torch
    import torchvision

    from features.cache import open_split

    full, paths, labels, subset = pick_images(args.images, tmp)
    results["images"] = len(paths)
    print(f"{len(paths)} images from {full.root}, device {device}, batch {batch}, workers {workers}", flush=True)
    # (a), (b): whole processes, one after the other on the same files (warm page cache for all: one read first)
    for path in paths:
        (full.root / path).read_bytes()
    runs = results["whole_process"] = {"plain": whole_process("plain", subset, tmp / "plain.npy", str(device), batch, workers)}
    runs["bare_fp32"] = whole_process("bare", subset, tmp / "bare", str(device), batch, workers)
    for precision in ("fp32", "bf16"):
        runs[f"project_{precision}"] = whole_process("project", subset, tmp / f"cache-{precision}", str(device),
                                                     batch, workers, precision)
    for name, r in runs.items():
        print(f"(a/b) {name:14s} whole process {r['whole_s']:6.1f} s = {r['whole_img_s']:6.1f} img/s"
              + (f"; steady {r['steady_img_s']:.1f} img/s" if r.get("steady_img_s") else ""), flush=True)
    # (c) the bare forwards
    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet(weights=None).eval()  # fc7: features, avgpool, fc6 and fc7 (as the bare child)
    backbone = torch.nn.Sequential(alexnet.features, alexnet.avgpool, torch.nn.Flatten(), alexnet.classifier[:6])
    backbone = backbone.to(device, memory_format=torch.channels_last)
    bare = results["bare_img_s"] = {}
    for mode in ("fp32", "bf16_cast", "bf16_autocast"):
        bare[mode] = time_bare_forward(backbone, batch, device, mode, args.bare_batches * (2 if mode == "fp32" else 1))
        print(f"(c) bare forward {mode:14s} {bare[mode]:7.1f} img/s", flush=True)
    f32 = open_split(tmp / "cache-fp32" / "train.h5").read_features()
    results["bf16_cosine_min"] = cosine_min(open_split(tmp / "cache-bf16" / "train.h5").read_features(), f32)
    results["fp32_cosine_vs_plain_min"] = cosine_min(f32, np.load(tmp / "plain.npy"))
    if not args.skip_head:
        measure_head(args.head_rows, results, full, paths, labels, f32, device)


def measure_head(head_rows: int, results: dict, full, paths, labels, f32, device) -> None:
    """(d) head epochs, and (e) the 20-epoch job against the backbone in every epoch."""
    import torch

    from pipeline.heads.linear import Recipe, fit_head
    from pipeline.heads.readers import InMemoryFeatures
    from pipeline.heads.standardize import Standardizer

    head = results["head"] = time_head_epochs(head_rows, 200, device)
    print(f"(d) head epoch on {head['rows']} rows: project {head['project_epoch_s']:.2f} s, bare loop "
          f"{head['bare_epoch_s']:.2f} s", flush=True)
    plain_epoch = plain_training_epoch_s(full.root, paths, labels, full.num_classes, device)
    features = InMemoryFeatures(torch.from_numpy(f32), torch.tensor(labels))
    start = time.perf_counter()
    fit_head(features, features, Recipe(epochs=EPOCHS), Standardizer.fit(features, device),
             num_classes=full.num_classes, device=device, progress=False)
    head_job = time.perf_counter() - start
    extract_s = results["whole_process"]["project_fp32"]["whole_s"]
    results["job"] = {"plain_20_epochs_s": EPOCHS * plain_epoch, "project_extract_s": extract_s,
                      "project_20_head_epochs_s": head_job, "speedup": EPOCHS * plain_epoch / (extract_s + head_job)}


def measure_phases(args, results: dict, out_json: Path) -> int:
    """--phases: decode / preprocess / transfer / forward / write CPU ms per image, and the fixed cost."""
    from benchmarks.extract_phases import fixed_cost, phase_times

    with tempfile.TemporaryDirectory() as tmp:
        full, paths, _, subset = pick_images(args.images, Path(tmp))
        phases = results["phases_cpu_ms_per_image"] = phase_times(full.root, paths)
        print("(phases) CPU ms per image: " + ", ".join(f"{k} {phases[k]}" for k in
              ("decode", "preprocess", "transfer", "forward", "write")), flush=True)
        for kind in ("cv2_upscale", "cv2_downscale"):
            print(f"(phases) {kind}: {phases[kind]}", flush=True)
        small = make_subset(full, paths[:16], Path(tmp) / "small")
        fixed = results["fixed_cost"] = fixed_cost(small, Path(tmp) / "fixed", 16, phases["bare_forward_img_s"])
        print(f"(fixed) {fixed}", flush=True)
    results["load_average_after"] = os.getloadavg()[0]
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out_json}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps({"plain": child_plain, "bare": child_bare, "project": child_project}[args.child](args)))
        return 0

    import torch

    from pipeline.common.hardware import cpu_kind, cpu_tag, describe_cpu

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = args.batch_size or (256 if device.type == "cuda" else 64)
    workers = args.workers if args.workers is not None else (8 if device.type == "cuda" else 1)
    kind = cpu_kind()
    out_json = args.out or RESULTS / f"extract-{cpu_tag(kind)}.json"
    print(f"CPU: {describe_cpu(kind)}; flags {' '.join(kind['flags'])}", flush=True)
    results = {"cpu": kind, "cpu_kind": describe_cpu(kind), "device": str(device), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "batch_size": batch, "workers": workers,
               "load_average_before": os.getloadavg()[0]}
    if args.phases:
        return measure_phases(args, results, out_json.with_name(f"extract-phases-{cpu_tag(kind)}.json"))
    if args.timeline:
        from benchmarks.extract_timeline import timeline_json
        return timeline_json(args, results, args.out or RESULTS / f"extract-timeline-{cpu_tag(kind)}.json", MINI)
    if args.feed:
        from benchmarks.extract_feed import feed_json
        return feed_json(args, results, args.out or RESULTS / f"extract-feed-{cpu_tag(kind)}.json", MINI)
    with tempfile.TemporaryDirectory() as tmp:
        measure(args, results, Path(tmp), device, batch, workers)
    results["load_average_after"] = os.getloadavg()[0]
    results["ratios"] = ratios(results)
    print_summary(results)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out_json.with_suffix(".png"))
    print(f"wrote {out_json} and {out_json.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
