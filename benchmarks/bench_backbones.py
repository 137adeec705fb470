"""Extraction speed per backbone: the project's whole process against the bare forward, on this CPU.

    python -m benchmarks.bench_backbones                              # alexnet, resnet50, vit_b_16
    python -m benchmarks.bench_backbones --backbones resnet18 --images 32
    python -m benchmarks.bench_backbones --backbones timm:vit_small_patch16_224,open_clip:ViT-B-32 --results backbones-zoo

For each backbone, on generated 64 px JPEGs (Tiny ImageNet's size), random weights, fp32, its default batch:
- bare forward: the one-pass module (AlexNet: its fc7 cut) on ready-made (B, 3, S, S) tensors, channels_last;
- whole process: ``run_extract.py --backbone NAME``'s command as its own Python process (imports, weights, graph tracing,
  workers, decoding, writing included), and its steady state as the extractor logs it (train split);
- peak memory: the whole process's maximum resident set (its DataLoader workers' separately).
Big models get fewer images (vit_b_16: about 17.5 GFLOPs per image). The CPU kind is printed and recorded.
timm and open_clip backbones (the zoo extra) are measured the same way. Writes
benchmarks/results/<--results, default backbones>-<cpu tag>.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_IMAGES = {"alexnet": 64, "resnet50": 32, "vit_b_16": 16}  # per backbone: fewer for the big ones
ZOO_IMAGES = {"timm:vit_small_patch16_224": 32, "open_clip:ViT-B-32": 32}  # one timm ViT, one CLIP image tower


def child(args) -> int:
    """One whole extraction in this process; prints its wall time, steady state and peak memory as JSON."""
    from pipeline.cli import run_main
    from pipeline.commands import run_extract
    from pipeline.common.config import ExtractConfig

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger().addHandler(Keep())
    config = ExtractConfig(data=args.data, out=Path(args.out), backbone=args.child, weights="random", device="cpu",
                           precision="fp32", progress=False)  # what run_extract.py makes of those flags
    code = run_main(lambda: run_extract(config))
    steady = [float(m.group(1)) for line in lines if line.startswith("train:")
              for m in [re.search(r"\(([\d.]+) img/s\)", line)] if m]
    print(json.dumps({"code": code, "steady_img_s": steady[0] if steady else None,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "workers_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
    return code


def bare_forward(name: str, batch: int, image_size: int, batches: int = 2) -> float:
    """img/s of the module the extraction runs, on ready-made normalised tensors (no data path)."""
    import torch

    from pipeline.backbones.backbone import open_backbone

    module = open_backbone(name, "random", image_size=image_size, progress=False).module  # its default layers
    run = module
    module = module.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        run(x)  # one untimed pass: allocator and oneDNN start-up
        start = time.perf_counter()
        for _ in range(batches):
            run(x)
    return batch * batches / (time.perf_counter() - start)


def measure(name: str, images: int, tmp: Path) -> dict:
    from pipeline.backbones.catalog import default_batch_size, preprocess_of, safe_name
    from pipeline.data.synthetic import make_tiny_imagenet

    classes = 2
    per_class = max(1, (images - classes) // classes)  # plus one val image per class
    data = make_tiny_imagenet(tmp / f"ds-{safe_name(name)}", num_classes=classes, train_per_class=per_class,
                              val_per_class=1)
    total = classes * (per_class + 1)
    batch = default_batch_size(name, "cpu")
    size = preprocess_of(name, "pretrained").image_size
    bare = bare_forward(name, min(batch, per_class * classes), size)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_backbones", "--child", name, "--data", str(data),
                           "--out", str(tmp / f"out-{safe_name(name)}")], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name}: the extraction failed:\n{done.stderr[-2000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    whole = total / wall
    return {"backbone": name, "images": total, "batch_size": batch, "image_size": size, "bare_img_s": round(bare, 2),
            "whole_process_img_s": round(whole, 2), "whole_ratio": round(whole / bare, 3),
            "steady_img_s": record["steady_img_s"],
            "steady_ratio": record["steady_img_s"] and round(record["steady_img_s"] / bare, 3),
            "wall_s": round(wall, 1), "peak_rss_mib": round(record["peak_rss_mib"]),
            "workers_peak_rss_mib": round(record["workers_peak_rss_mib"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default=",".join(DEFAULT_IMAGES))
    p.add_argument("--images", type=int, default=None, help="images per backbone (default: 64, 32 resnet50, 16 vit)")
    p.add_argument("--results", default="backbones", help="the results file's name, before the CPU tag")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    import torch

    from pipeline.common.hardware import cpu_kind, cpu_tag, describe_cpu

    kind = cpu_kind()
    print(f"CPU: {describe_cpu(kind)}; torch {torch.__version__}, {torch.get_num_threads()} threads; the machine "
          "may be shared: figures are indicative")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [n.strip() for n in args.backbones.split(",") if n.strip()]:
            row = measure(name, args.images or {**DEFAULT_IMAGES, **ZOO_IMAGES}.get(name, 32), Path(tmp))
            rows.append(row)
            print(f"{name:26s} {row['images']:4d} img  bare {row['bare_img_s']:7.1f} img/s  whole process "
                  f"{row['whole_process_img_s']:6.1f} img/s ({row['whole_ratio']:.2f} of bare)  steady "
                  f"{row['steady_img_s']} img/s ({row['steady_ratio']} of bare)  peak {row['peak_rss_mib']} MiB "
                  f"(+ workers {row['workers_peak_rss_mib']} MiB)", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{args.results}-{cpu_tag(kind)}.json"
    path.write_text(json.dumps({"cpu": kind, "torch": torch.__version__, "threads": torch.get_num_threads(),
                                "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
