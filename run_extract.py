"""Stage one: extract AlexNet features (fc7, or also pool5 and fc6) once into the HDF5 cache.

    python run_extract.py --device cuda                          # data/tiny-imagenet-200 -> runs/features
    python run_extract.py --device cuda --layers pool5,fc6,fc7   # DeCAF's three layers, one backbone pass
    python run_extract.py --data tiny-imagenet-200.zip --weights alexnet-owt-7be5be79.pth
    python run_extract.py --download                             # fetch and check the official zip first
    python run_extract.py --data DIR --prepare-only --summary-json prep.json
    torchrun --nproc_per_node=4 run_extract.py --device cuda     # one shard list, several GPUs
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
from pathlib import Path

from pipeline.cli import run_main

log = logging.getLogger("run_extract")


def build_parser() -> argparse.ArgumentParser:
    from pipeline.common.config import ExtractConfig
    from pipeline.common.names import DTYPES, PRECISIONS
    from pipeline.common.preprocess import MODES

    d = ExtractConfig()  # every default comes from here
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", default=d.data, help="Tiny ImageNet folder or its zip (default: data/tiny-imagenet-200)")
    data.add_argument("--download", action="store_true", help="download the official zip (md5-checked) and unpack it")
    data.add_argument("--url", default=d.url, help="download address (a mirror)")
    data.add_argument("--md5", default=d.md5, help="expected md5 of the downloaded zip")
    data.add_argument("--prepare-only", action="store_true", help="prepare and check the data, print a summary, stop")
    data.add_argument("--summary-json", type=Path, help="also write the preparation summary here")
    data.add_argument("--arrange-val", action="store_true",
                      help="hard-link val images into val/<wnid>/images/ (the only option that writes to the dataset)")
    data.add_argument("--strict", action="store_true", help="an undecodable image is an error, not a listed skip")
    model = p.add_argument_group("backbone")
    model.add_argument("--weights", default=d.weights,
                       help="imagenet (torchvision IMAGENET1K_V1), random (for tests), or a state_dict path")
    model.add_argument("--seed", type=int, default=d.seed, help="seed for --weights random")
    model.add_argument("--layers", default=",".join(d.layers),
                       help="comma list of cached layers: pool5 (9216-d), fc6, fc7 (4096-d); layers missing from "
                            "an existing cache are added, the others left as they are")
    model.add_argument("--image-size", type=int, default=d.preprocess.image_size, help="side of the network input")
    model.add_argument("--resize-size", type=int, default=d.preprocess.resize_size,
                       help="shorter side before the centre crop (raised to --image-size if smaller)")
    model.add_argument("--resize-mode", choices=MODES, default=d.preprocess.mode,
                       help="crop: resize then centre-crop (AlexNet eval); resize: squash to image-size")
    run = p.add_argument_group("run")
    run.add_argument("--out", type=Path, default=d.out, help="cache folder for train.h5 and val.h5")
    run.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    run.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                     help="compute precision (the backbone's weights are cast once; default bf16 on CUDA, fp32 on CPU)")
    run.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="storage dtype")
    run.add_argument("--batch-size", type=int, default=d.batch_size,
                     help="images per forward pass (default 64 on CPU, 256 on CUDA)")
    run.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers (default 1 on CPU; on CUDA the usable CPUs per local rank less one, up to 16)")
    run.add_argument("--shard-size", type=int, default=d.shard_size, help="rows per resumable shard")
    run.add_argument("--compression", choices=("gzip", "lzf"), default=d.compression, help="HDF5 compression of the features")
    run.add_argument("--overwrite", action="store_true", help="replace a cache made with other settings")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def prepare(args: argparse.Namespace) -> int:
    from pipeline.data.prepare import prepare_dataset

    summary = prepare_dataset(args.data, download=args.download, url=args.url, md5=args.md5,
                              arrange=args.arrange_val, strict=args.strict, progress=not args.no_progress)
    log.info("%s: %d classes", summary["root"], summary["num_classes"])
    for name, split in summary["splits"].items():
        log.info("  %-5s %6d images, %d-%d per class, %d skipped", name, split["images"],
                 split["per_class_min"], split["per_class_max"], split["skipped"])
    for item in summary["skipped"]:
        log.info("  skipped %s: %s", item["path"], item["reason"])
    if args.summary_json:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def make_config(args: argparse.Namespace):
    from pipeline.common.config import ExtractConfig
    from pipeline.common.errors import UserError
    from pipeline.common.preprocess import Preprocess

    try:
        preprocess = Preprocess(image_size=args.image_size, resize_size=max(args.resize_size, args.image_size),
                                mode=args.resize_mode)
    except ValueError as err:
        raise UserError(f"bad preprocessing options: {err}") from None
    return ExtractConfig(
        data=args.data, download=args.download, url=args.url, md5=args.md5, out=args.out, weights=args.weights,
        seed=args.seed, device=args.device, precision=args.precision, dtype=args.dtype, batch_size=args.batch_size,
        workers=args.workers, preprocess=preprocess, shard_size=args.shard_size, compression=args.compression,
        overwrite=args.overwrite, strict=args.strict, arrange_val=args.arrange_val, progress=not args.no_progress,
        layers=tuple(name.strip() for name in args.layers.split(",") if name.strip()))


def extract(args: argparse.Namespace) -> int:
    from pipeline.commands import extract as extract_command

    return extract_command(make_config(args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: prepare(args) if args.prepare_only else extract(args))


if __name__ == "__main__":
    code = main()
    gc.freeze()  # exit without the collector walking torch's ~2,300 modules: ~1 s of a loaded 2-core machine
    raise SystemExit(code)
