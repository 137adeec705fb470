"""Stage one: extract a frozen backbone's features once into the HDF5 cache (default: AlexNet's fc7; pool5, fc6 too).

    python run_extract.py --device cuda                          # data/tiny-imagenet-200 -> runs/features
    python run_extract.py --device cuda --layers pool5,fc6,fc7   # DeCAF's three layers, one backbone pass
    python run_extract.py --backbone resnet50                    # -> runs/features-resnet50 (penultimate layer)
    python run_extract.py --backbone vit_b_16 --layers penultimate,encoder.layers.encoder_layer_6
    python run_extract.py --list-backbones                       # every backbone name, of the three families
    python run_extract.py --backbone timm:vit_small_patch14_dinov2.lvd142m   # timm and open_clip: requirements-zoo.txt
    python run_extract.py --list-layers resnet50                 # the layer names --layers takes for one
    python run_extract.py --data tiny-imagenet-200.zip --weights alexnet-owt-7be5be79.pth
    python run_extract.py --download                             # fetch and check the official zip first
    python run_extract.py --data DIR --prepare-only --summary-json prep.json
    python run_extract.py --data DIR --pack packed && python run_extract.py --data packed   # tar shards in
    torchrun --nproc_per_node=4 run_extract.py --device cuda     # one shard list, several GPUs

Every flag is the ExtractConfig field of the same name (pipeline.common.config).
"""
from __future__ import annotations

import argparse
import gc
from pathlib import Path

from pipeline.cli import comma_list, run_main


def build_parser() -> argparse.ArgumentParser:
    """Every flag is the ExtractConfig field of the same name, with its default from there."""
    from pipeline.common.config import ExtractConfig

    d = ExtractConfig()  # every default comes from here
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _data_options(p, d)
    _backbone_options(p, d)
    _run_options(p, d)
    return p


def _data_options(p: argparse.ArgumentParser, d) -> None:
    data = p.add_argument_group("data")
    data.add_argument("--data", default=d.data,
                      help="dataset folder or its zip: Tiny ImageNet, ImageFolder with splits (ROOT/train/<class>/, "
                           "ROOT/val/<class>/) or one ImageFolder (ROOT/<class>/) (default: data/tiny-imagenet-200)")
    data.add_argument("--val-fraction", type=float, default=d.val_fraction,
                      help="one ImageFolder (ROOT/<class>/): the share of each class held out for val, chosen by a "
                           "hash of each image's path so an image never changes split as others are added "
                           f"(default {d.val_fraction})")
    data.add_argument("--download", action="store_true", help="download the official zip (md5-checked) and unpack it")
    data.add_argument("--url", default=d.url, help="download address (a mirror)")
    data.add_argument("--md5", default=d.md5, help="expected md5 of the downloaded zip")
    data.add_argument("--prepare-only", action="store_true", help="prepare and check the data, print a summary, stop")
    data.add_argument("--pack", type=Path, default=d.pack, metavar="OUT",
                      help="write the dataset as tar shards (OUT/train/*.tar, OUT/val/*.tar, up to --shard-size images "
                           "each) and OUT/manifest.json, then stop; --data OUT then reads the pack (docs/data.md)")
    data.add_argument("--summary-json", type=Path, default=d.summary_json, help="also write the preparation summary here")
    data.add_argument("--arrange-val", action="store_true",
                      help="hard-link val images into val/<wnid>/images/ (the only option that writes to the dataset)")
    data.add_argument("--strict", action="store_true", help="an undecodable image is an error, not a listed skip")


def _backbone_options(p: argparse.ArgumentParser, d) -> None:
    from pipeline.common.preprocess import MODES

    model = p.add_argument_group("backbone")
    model.add_argument("--backbone", default=d.backbone,
                       help=f"a torchvision classification model (default {d.backbone}): resnet50, vit_b_16, ...; "
                            "timm:ARCH[.TAG] (timm:vit_small_patch14_dinov2.lvd142m) or open_clip:ARCH[/TAG] "
                            "(open_clip:ViT-B-32/laion2b_s34b_b79k) with the zoo extra (--list-backbones)")
    model.add_argument("--list-backbones", nargs="?", const="*", default=d.list_backbones, metavar="PATTERN",
                       help="print the backbone names of the three families (those matching PATTERN, such as "
                            "'*dinov2*') and stop")
    model.add_argument("--list-layers", metavar="NAME", default=d.list_layers,
                       help="print the layer names --layers takes for backbone NAME (its named layers, then its graph "
                            "nodes in order) and stop")
    model.add_argument("--weights", default=d.weights,
                       help="pretrained (the default: the weights the backbone's name names, from its family's "
                            "local cache or downloaded; on torchvision models the DEFAULT weights, also called "
                            "imagenet, recorded by their exact enum), an exact X_Weights.MEMBER, random (for tests), "
                            "or a .pth, .bin or .safetensors state_dict")
    model.add_argument("--seed", type=int, default=d.seed, help="seed for --weights random")
    model.add_argument("--layers", type=comma_list(), default=None,  # None: the backbone's default (ExtractConfig)
                       help="comma list of cached layers: the backbone's named layers (the default backbone's: pool5 "
                            "(9216-d), fc6, fc7 (4096-d; its default)), penultimate (the input of the last Linear; "
                            "other models' default) or graph node names (--list-layers NAME lists them). Layers "
                            "missing from an existing cache are added, the others left as they are")
    model.add_argument("--image-size", type=int, default=d.image_size,
                       help="side of the network input (default: the weights' own crop, 224 for most)")
    model.add_argument("--resize-size", type=int, default=d.resize_size,
                       help="shorter side before the centre crop, raised to --image-size if smaller (default: the "
                            "weights' own, 256 for most)")
    model.add_argument("--resize-mode", choices=MODES, default=d.resize_mode,
                       help="crop: resize the shorter side, then centre-crop; resize: squash to image-size (default: "
                            "the weights' own)")


def _run_options(p: argparse.ArgumentParser, d) -> None:
    from pipeline.backbones.precision import PRECISION_CHOICES
    from pipeline.common.names import DTYPES

    run = p.add_argument_group("run")
    run.add_argument("--out", type=Path, default=None,  # None: the backbone's own folder (ExtractConfig)
                     help="cache folder for train.h5 and val.h5 (default runs/features; runs/features-NAME for "
                          "another --backbone)")
    run.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    run.add_argument("--precision", choices=PRECISION_CHOICES, default=d.precision,
                     help="compute precision, the backbone's weights cast once (default auto: the fastest of fp32, bf16 "
                          "and fp16 on CUDA whose features stay at cosine >= 0.999 to fp32's, timed on the first batch)")
    run.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="storage dtype")
    run.add_argument("--batch-size", type=int, default=d.batch_size,
                     help="images per forward pass (default per model: 64 on CPU and 256 on CUDA for the default "
                          "backbone, fewer for big models)")
    run.add_argument("--workers", type=int, default=d.workers, help="image readers: threads on the CPU (default 1; 0 reads in the main thread), DataLoader worker processes on CUDA (default: the usable CPUs per local rank less one, up to 16)")
    run.add_argument("--shard-size", type=int, default=d.shard_size, help="rows per resumable shard")
    run.add_argument("--compression", choices=("gzip", "lzf"), default=d.compression, help="HDF5 compression of the features")
    run.add_argument("--overwrite", action="store_true", help="replace a cache made with other settings")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress,
                     help="progress bars (--no-progress: none)")


def main(argv: list[str] | None = None) -> int:
    from pipeline.commands import run_extract
    from pipeline.common.config import ExtractConfig

    args = build_parser().parse_args(argv)  # sizes not given stay None: the weights' own
    if not (args.pack or args.prepare_only or args.list_backbones or args.list_layers) and argv is None:
        # a one-shot extraction: importing torch and torchvision makes ~340,000 objects, which the collector would walk
        # five times as they import (0.35 s of a 2-core machine) and once more while the backbone is set up (0.16 s).
        # None of it is garbage: collection stays off until they are imported, then everything alive is frozen out
        # of later walks and collection is back on (pipeline.commands.extract). The app keeps collection on
        gc.disable()
    try:
        return run_main(lambda: run_extract(ExtractConfig(**vars(args))))
    finally:
        gc.enable()


if __name__ == "__main__":
    code = main()
    gc.freeze()  # exit without the collector walking torch's ~2,300 modules: ~1 s of a loaded 2-core machine
    raise SystemExit(code)
