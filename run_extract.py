"""Stage one: extract AlexNet fc7 features once into the HDF5 cache.

    python run_extract.py --device cuda                          # data/tiny-imagenet-200 -> runs/features
    python run_extract.py --data tiny-imagenet-200.zip --weights alexnet-owt-7be5be79.pth
    python run_extract.py --download                             # fetch and check the official zip first
    python run_extract.py --data DIR --prepare-only --summary-json prep.json
    torchrun --nproc_per_node=4 run_extract.py --device cuda     # one shard list, several GPUs
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from pipeline.cli import run_main

log = logging.getLogger("run_extract")


def build_parser() -> argparse.ArgumentParser:
    from pipeline.dataset import TINY_IMAGENET_MD5, TINY_IMAGENET_URL
    from pipeline.preprocess import MODES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", help="Tiny ImageNet folder or its zip (default: data/tiny-imagenet-200)")
    data.add_argument("--download", action="store_true", help="download the official zip (md5-checked) and unpack it")
    data.add_argument("--url", default=TINY_IMAGENET_URL, help="download address (a mirror)")
    data.add_argument("--md5", default=TINY_IMAGENET_MD5, help="expected md5 of the downloaded zip")
    data.add_argument("--prepare-only", action="store_true", help="prepare and check the data, print a summary, stop")
    data.add_argument("--summary-json", type=Path, help="also write the preparation summary here")
    data.add_argument("--arrange-val", action="store_true",
                      help="hard-link val images into val/<wnid>/images/ (the only option that writes to the dataset)")
    data.add_argument("--strict", action="store_true", help="an undecodable image is an error, not a listed skip")
    model = p.add_argument_group("backbone")
    model.add_argument("--weights", default="imagenet",
                       help="imagenet (torchvision IMAGENET1K_V1), random (for tests), or a state_dict path")
    model.add_argument("--seed", type=int, default=0, help="seed for --weights random")
    model.add_argument("--image-size", type=int, default=224, help="side of the network input")
    model.add_argument("--resize-size", type=int, default=256, help="shorter side before the centre crop (raised to --image-size if smaller)")
    model.add_argument("--resize-mode", choices=MODES, default="crop",
                       help="crop: resize then centre-crop (AlexNet eval); resize: squash to image-size")
    run = p.add_argument_group("run")
    run.add_argument("--out", type=Path, default=Path("runs/features"), help="cache folder for train.h5 and val.h5")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    run.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="compute precision")
    run.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage dtype")
    run.add_argument("--batch-size", type=int, help="images per forward pass (default 64 on CPU, 256 on CUDA)")
    run.add_argument("--workers", type=int, help="DataLoader workers (default 1 on CPU, up to 8 on CUDA)")
    run.add_argument("--shard-size", type=int, default=2048, help="rows per resumable shard")
    run.add_argument("--compression", choices=("gzip", "lzf"), help="HDF5 compression of the features")
    run.add_argument("--overwrite", action="store_true", help="replace a cache made with other settings")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def prepare(args: argparse.Namespace) -> int:
    from pipeline.dataset import prepare_dataset

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


def already_up_to_date(args: argparse.Namespace, preprocess) -> bool:
    """A torch-free look at an existing cache: True when both splits are complete with these exact settings.

    Importing torch takes seconds, so a rerun checks the recorded settings, dataset signature and weights
    stamp first. False only means the full check (which fingerprints the weights) decides.
    """
    from features.cache import quick_up_to_date, split_file
    from pipeline.dataset import index_dataset, resolve_data
    from pipeline.weights_spec import describe_weights, weights_stamp

    if args.overwrite or args.download or args.arrange_val or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return False
    dataset = index_dataset(resolve_data(args.data))
    spec = describe_weights(args.weights, args.seed)
    common = {"backbone": "alexnet", "layer": "fc7", "preprocess": preprocess.to_json(), "dtype": args.dtype,
              "precision": args.precision, "weights_spec": spec, "weights_stamp": weights_stamp(spec)}
    found = {split: quick_up_to_date(split_file(args.out, split), {**common, "dataset_signature": dataset.signature(split)})
             for split in ("train", "val")}
    if not all(found.values()):
        return False
    if spec.startswith("random"):
        log.warning("NOTE: the backbone has random weights (%s); these features are for testing only", spec)
    for split, attrs in found.items():
        path = split_file(args.out, split)
        log.info("%s: up to date, %d rows in %s (%.1f MiB)", split, attrs["num_rows"], path, path.stat().st_size / 2**20)
    return True


def extract(args: argparse.Namespace) -> int:
    from pipeline.errors import UserError
    from pipeline.preprocess import Preprocess

    try:
        preprocess = Preprocess(image_size=args.image_size, resize_size=max(args.resize_size, args.image_size),
                                mode=args.resize_mode)
    except ValueError as err:
        raise UserError(f"bad preprocessing options: {err}") from None
    if already_up_to_date(args, preprocess):
        return 0
    from features.extract import ExtractConfig  # imports torch: only when there is work or a full check to do
    from features.extract import extract as extract_features

    config = ExtractConfig(
        data=args.data, download=args.download, url=args.url, md5=args.md5, out=args.out, weights=args.weights,
        seed=args.seed, device=args.device, precision=args.precision, dtype=args.dtype, batch_size=args.batch_size,
        workers=args.workers, preprocess=preprocess, shard_size=args.shard_size, compression=args.compression,
        overwrite=args.overwrite, strict=args.strict, arrange_val=args.arrange_val, progress=not args.no_progress)
    summary = extract_features(config)
    if summary["weights"].startswith("random"):
        log.warning("NOTE: the backbone has random weights (%s); these features are for testing only", summary["weights"])
    for split, s in summary["splits"].items():
        if s["status"] == "up to date":
            log.info("%s: up to date, %d rows in %s (%.1f MiB)", split, s["images"], s["file"], s["file_mb"])
        elif s["status"] == "extracted":
            log.info("%s: %d images in %.1f s (%.1f img/s), %d skipped -> %s (%.1f MiB)", split, s["images"],
                     s["seconds"], s["images_per_s"] or 0, s["skipped"], s["file"], s["file_mb"])
            for item in s["skipped_list"]:
                log.info("  skipped %s: %s", item["path"], item["reason"])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: prepare(args) if args.prepare_only else extract(args))


if __name__ == "__main__":
    raise SystemExit(main())
