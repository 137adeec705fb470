"""The settings of the commands, each default defined once, with their checks. Torch-free.

The entry scripts build their argparse defaults from these dataclasses (run_webcam.py leaves the flags not typed
out, and the dataclass fills them in), so a default lives here only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

from pipeline.common.errors import UserError
from pipeline.common.names import (DEFAULT_CHECKPOINT, DEFAULT_FEATURES, DEFAULT_HEAD, DEFAULT_PROJECT, DTYPES,
                                   TINY_IMAGENET_MD5, TINY_IMAGENET_URL, VAL_FRACTION)
from pipeline.common.preprocess import MODES

MAX_RATE = 1e3  # --lr and --weight-decay: far above any useful value, far below float32 overflow
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit integer
MAX_BATCH_FRAMES = 256  # live --batch-frames: a pass over 8 frames already reads fc6/fc7 once for all of them
COLLECT_EVERY = 5  # live --collect: save every 5th frame (consecutive camera frames are near-duplicates)
COLLECT_COUNT = 60  # live --collect: frames saved per burst
COLLECT_COUNTDOWN = 3.0  # live --collect: seconds on a camera before saving starts (a video or folder: 0)


def check_val_fraction(fraction: float) -> None:
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0 < fraction < 1):
        raise UserError(f"--val-fraction {fraction}: it must be between 0 and 1 (exclusive), the share of each "
                        "class's images held out for val, such as 0.2")


def check_seed(seed: int) -> None:
    """One rule for every --seed: what torch.manual_seed takes, without overflow."""
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be from 0 to 2**63-1, got {seed}")


def _positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise UserError(f"{name} must be positive, got {value}")


@dataclass
class ExtractConfig:
    """Stage one: which images, which backbone, and how the cache is computed and stored.

    What depends on the backbone (its default layers and cache folder, its preprocessing, the precision names)
    is the backbone package's: ``pipeline.extract.loading.settle`` fills the defaults in and checks them.
    """

    data: str | None = None  # dataset folder or zip; None: data/tiny-imagenet-200 (or its zip)
    download: bool = False  # fetch the official zip first
    url: str = TINY_IMAGENET_URL
    md5: str | None = TINY_IMAGENET_MD5
    out: Path | None = None  # train.h5 and val.h5 go here; None: the backbone's own (runs/features, -NAME for others)
    backbone: str = "alexnet"  # the default backbone; a torchvision model, timm:ARCH[.TAG], open_clip:ARCH[/TAG]
    list_backbones: str | None = None  # print the backbone names (matching this pattern; "*": all) and stop
    list_layers: str | None = None  # print this backbone's layer names (what --layers takes) and stop
    weights: str = "pretrained"  # pretrained (the weights the name names; torchvision: imagenet), random, or a file
    seed: int = 0  # for --weights random
    device: str = "auto"
    precision: str = "auto"  # auto (the fastest faithful, measured: pipeline.backbones.precision), fp32, bf16 or fp16
    dtype: str = "float32"  # storage dtype of the features
    batch_size: int | None = None  # None: per backbone, from its size and the free memory
    workers: int | None = None  # image readers: threads on the CPU (None: 1), DataLoader workers on CUDA (None: the
    # usable CPUs per local rank - 1, up to 16)
    image_size: int | None = None  # the side of the network input; None: the weights' own
    resize_size: int | None = None  # "crop": the shorter side before the centre crop (raised to image_size if
    # smaller); None: the weights' own
    resize_mode: str | None = None  # "crop" (resize the shorter side, then centre-crop) or "resize" (squash to
    # image_size); None: the weights' own
    shard_size: int = 2048  # rows per resumable shard
    compression: str | None = None  # None, "gzip" or "lzf"
    overwrite: bool = False
    strict: bool = False  # an undecodable image is an error instead of a listed skip
    arrange_val: bool = False  # hard-link val images into val/<wnid>/images/ first (writes into the dataset)
    val_fraction: float = VAL_FRACTION  # one ImageFolder (ROOT/<class>/*): the share held out for val, by a hash of each path
    splits: tuple[str, ...] = ("train", "val")
    progress: bool = True
    layers: tuple[str, ...] | None = None  # cached layers (one pass fills them all); None: default_layers(backbone)
    prepare_only: bool = False  # prepare and check the data, log a summary, stop
    pack: Path | None = None  # write the dataset as tar shards and a manifest here (pipeline.data.pack), stop
    summary_json: Path | None = None  # also write the preparation summary here

    def check(self) -> None:
        """The settings that need no backbone (the backbone's own are checked by pipeline.extract.loading.settle)."""
        if self.layers is not None:
            bad = [layer for layer in self.layers if "/" in layer or not layer]  # the cache's own names: the family
            if bad or not self.layers:
                raise UserError(f"--layers {','.join(self.layers)}: use a comma list of the model's layer names "
                                f"(list them with: python run_extract.py --list-layers {self.backbone})")
            self.layers = tuple(dict.fromkeys(self.layers))
        if self.resize_mode is not None and self.resize_mode not in MODES:
            raise UserError(f"--resize-mode {self.resize_mode}: use {' or '.join(MODES)}")
        for name, value in (("--image-size", self.image_size), ("--resize-size", self.resize_size)):
            _positive(name, value)
        check_seed(self.seed)
        check_val_fraction(self.val_fraction)
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype}: use {' or '.join(DTYPES)}")
        _positive("--batch-size", self.batch_size)
        _positive("--shard-size", self.shard_size)
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers must be 0 or more, got {self.workers}")


LINEAR_WEIGHT_DECAY = (0.0,)  # linear: SGD weight decay when --weight-decay is not given
# logreg: L2 penalties on standardized features, warm-started strongest first (strong ones converge fastest)
LOGREG_WEIGHT_DECAY = (0.1, 0.01, 0.001)
LOGREG_MAX_ITER = 1000  # logreg: a guard only; each penalty is solved until the gradient bounds its gap to the optimum
# logreg --weight-decay sweep:N: C = 10^linspace(-6, 5, N), Kornblith et al. (2019) and DINOv2's 45 values
SWEEP_EXPONENTS = (-6.0, 5.0)
SELECTIONS = ("train-split", "val")  # --select: what chooses the hyper-parameters (pipeline.heads.selection)
SELECT_FRACTION = 0.1  # --select train-split: the share of each class's train rows held out to choose on
MAX_SWEEP = 1000  # values in one --weight-decay sweep
ZERO_SHOT = "zeroshot"  # the CLIP zero-shot head: built from text, 0 shots, nothing to choose (selected by "none")
ZERO_SHOT_TEMPLATES = 80  # its prompts: open_clip's OPENAI_IMAGENET_TEMPLATES (CLIP's 80 ImageNet templates)


def sweep_values(spec: str) -> tuple[float, ...]:
    """The C values of ``--weight-decay sweep:N`` (C = 10^linspace(-6, 5, N)) or ``logspace:A:B:N`` (10^linspace(A, B, N)),
    smallest first; anything else is one line."""
    parts = spec.split(":")
    try:
        if parts[0] == "sweep" and len(parts) == 2:
            low, high, count = *SWEEP_EXPONENTS, int(parts[1])
        elif parts[0] == "logspace" and len(parts) == 4:
            low, high, count = float(parts[1]), float(parts[2]), int(parts[3])
        else:
            raise ValueError
    except ValueError:
        raise UserError(f"--weight-decay {spec}: use numbers (0.1,0.01), sweep:N (C = 10^linspace(-6, 5, N)) or "
                        "logspace:A:B:N (C = 10^linspace(A, B, N))") from None
    if not (1 <= count <= MAX_SWEEP and math.isfinite(low) and math.isfinite(high) and -30 <= low <= high <= 30):
        raise UserError(f"--weight-decay {spec}: N must be from 1 to {MAX_SWEEP} and A <= B between -30 and 30 "
                        "(exponents of ten)")
    return tuple(10.0 ** (low + (high - low) * i / max(count - 1, 1)) for i in range(count))


@dataclass
class HeadConfig:
    """Stage two: the cache to read, the run folder, the heads to compare and their recipes.

    Each field is named as its run_train_head.py flag (``lr`` is ``--lr``). One head is today's run. Several
    layers, heads, shots, learning rates or weight decays make a grid: one folder per combination and one
    table (pipeline.heads.experiments.grid).
    """

    features: Path = DEFAULT_FEATURES  # folder with train.h5 and val.h5; a comma list compares several caches
    out: Path = DEFAULT_HEAD  # run folder
    head: tuple[str, ...] = ("linear",)  # any of pipeline.heads.registry.HEADS
    layers: tuple[str, ...] | None = None  # cached layers to train on; None: each cache's default (its backbone's)
    shots: tuple[int | None, ...] = (None,)  # train images per class, drawn with `seed`; None: all of them
    lr: tuple[float, ...] = (0.001,)  # linear: several give one head per (lr, weight decay)
    # linear: SGD weight decays (a sweep); logreg: its penalty path. None: LINEAR_ / LOGREG_WEIGHT_DECAY. logreg also
    # takes a C sweep as text, "sweep:45" or "logspace:A:B:N" (sweep_values): lambda = 1 / (n C) for n train rows
    weight_decay: tuple[float, ...] | str | None = None
    max_iter: int = LOGREG_MAX_ITER  # logreg: L-BFGS iterations per penalty at most (hitting it is logged)
    k: tuple[int, ...] = (10, 20, 100, 200)  # knn: neighbours, all answered from one top-k search
    temperature: float = 0.07  # knn: a neighbour's vote is exp(similarity / T) (DINO's eval_knn.py)
    knn_chunk_rows: int = 256  # knn: val rows per similarity block; memory ~ chunk x train rows x 4 bytes
    momentum: float = 0.9
    epochs: int = 20
    batch_size: int = 100
    val_batch_size: int = 10
    seed: int = 0  # head init and batch order
    device: str = "auto"
    standardize: bool = True  # z-score with train statistics, folded into the saved layer
    # linear, logreg, knn: stream from the cache even if the features fit; None (or False): only when they do not
    stream: bool | None = None
    progress: bool = True
    # what chooses the hyper-parameters: "train-split" (held-out train rows, then a refit on all) or "val"; None: each
    # head's default (select_for)
    select: str | None = None
    select_fraction: float = SELECT_FRACTION  # train-split: each class's share of train rows held out (at least one)
    skip_existing: bool | None = None  # rerun nothing whose result.json matches; None: skips_existing's default
    table: tuple[Path, ...] | None = None  # gather every result.json below these folders into a table in --out; train nothing
    class_prompts: Path | None = None  # zeroshot: the class names put into the templates, one line per class in the
    # cache's class order; None: the cache's names (words.txt's first synonym, or the folder name, "_" read as " ")
    weights: str | None = None  # zeroshot: the CLIP weights of the text tower (a file); None: those the cache records

    def weight_decays(self, default: tuple[float, ...]) -> tuple[float, ...]:
        """--weight-decay as given, else a head's own ``default``: one list serves linear and logreg (not a C sweep)."""
        if self.is_sweep:
            raise UserError(f"--weight-decay {self.weight_decay} is logreg's C sweep; linear heads take numbers")
        return default if self.weight_decay is None else self.weight_decay

    @property
    def is_sweep(self) -> bool:
        """--weight-decay is a C sweep (logreg only), not a list of penalties."""
        return isinstance(self.weight_decay, str)

    def skips_existing(self, grid: bool) -> bool:
        """--skip-existing as given, else on for a grid and for a sweep of linear heads (several --lr or
        --weight-decay), off for one head."""
        if self.skip_existing is not None:
            return self.skip_existing
        sweep = "linear" in self.head and not self.is_sweep and len(self.lr) * len(self.weight_decay or (0,)) > 1
        return grid or sweep

    def select_for(self, head: str) -> str:
        """--select as given, else the head's default: val for the seed recipe's plain linear head (one lr and one
        weight decay: 20 epochs, the best by val), train-split for every other head and for a linear sweep; zero-shot
        has nothing to choose ("none")."""
        if head == ZERO_SHOT:
            return "none"
        if self.select is not None:
            return self.select
        plain = head == "linear" and len(self.lr) * len(self.weight_decays(LINEAR_WEIGHT_DECAY)) == 1
        return "val" if plain else "train-split"

    def check(self) -> None:
        for name, values in (("--lr", self.lr), ("--weight-decay", self.weight_decay), ("--head", self.head),
                             ("--layers", self.layers), ("--shots", self.shots), ("--k", self.k)):
            if values is not None and not values:
                raise UserError(f"{name} needs at least one value")
        # the layer names are checked against each cache's backbone (pipeline.heads.sources)
        if any(shots is not None and shots < 1 for shots in self.shots):
            raise UserError(f"--shots must be a positive number of images per class or 'all', got "
                            f"{','.join('all' if s is None else str(s) for s in self.shots)}")
        if any(k < 1 for k in self.k):
            raise UserError(f"--k must be positive, got {','.join(map(str, self.k))}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise UserError(f"--temperature must be a positive finite number (votes are exp(similarity / T)), "
                            f"got {self.temperature}")
        _positive("--max-iter", self.max_iter)
        _positive("the kNN chunk size", self.knn_chunk_rows)
        # NaN fails every comparison; beyond MAX_RATE the products with gradients overflow float32 (a traceback)
        if any(not (0 < lr <= MAX_RATE) for lr in self.lr):
            raise UserError(f"--lr must be above 0 and at most {MAX_RATE:g}, got {','.join(map(str, self.lr))}")
        if self.is_sweep:
            sweep_values(self.weight_decay)
            if "linear" in self.head:  # bounds below are for explicit values only: a sweep's lambda follows from n
                raise UserError(f"--weight-decay {self.weight_decay} is logreg's C sweep; a linear head takes numbers "
                                "(--weight-decay 0,1e-4): run linear with those, logreg with the sweep")
        elif any(not (0 <= wd <= MAX_RATE) for wd in self.weight_decay or ()):
            raise UserError(f"--weight-decay must be from 0 to {MAX_RATE:g}, got {','.join(map(str, self.weight_decay))}")
        if self.select is not None and self.select not in SELECTIONS:
            raise UserError(f"--select {self.select}: use {' or '.join(SELECTIONS)}")
        if not (isinstance(self.select_fraction, (int, float)) and 0 < self.select_fraction < 1):
            raise UserError(f"--select-fraction {self.select_fraction}: it must be between 0 and 1 (exclusive), the "
                            "share of each class's train rows held out to choose the hyper-parameters, such as 0.1")
        given = [flag for flag, value in (("--class-prompts", self.class_prompts), ("--weights", self.weights))
                 if value is not None]
        if given and ZERO_SHOT not in self.head:
            raise UserError(f"{given[0]} is for --head {ZERO_SHOT} (its class names, its text tower's weights); add "
                            f"{ZERO_SHOT} to --head, or drop {given[0]}")
        if not (0 <= self.momentum <= 1):
            raise UserError(f"--momentum must be from 0 to 1, got {self.momentum}")
        check_seed(self.seed)
        for name, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size),
                            ("--val-batch-size", self.val_batch_size)):
            _positive(name, value)


RUNTIMES = ("torch", "onnxruntime", "opencv")  # live: what runs the classifier (pipeline.live.classifier)


@dataclass
class FramesConfig:
    """What both run_webcam.py commands (live classification and --collect) read frames from, and how they are shown."""

    source: str = "0"  # camera index, video file, image file or folder of images
    width: int | None = None  # requested camera resolution
    height: int | None = None
    max_frames: int | None = None  # stop after this many frames read
    display: bool | None = None  # None: show a window when a display is present; --no-display: False
    window: str = "live"  # the window's title

    def check(self) -> None:
        for name, value in (("--width", self.width), ("--height", self.height)):
            _positive(name, value)
        if self.max_frames is not None and self.max_frames < 1:
            raise UserError(f"--max-frames must be at least 1, got {self.max_frames}")
        if not str(self.source).strip():
            raise UserError("--source is empty; pass a camera index (0), a video file, an image or a folder of images")


@dataclass
class LiveConfig(FramesConfig):
    """Live: the classifier (a checkpoint, or an exported graph and its runtime; or --export, which writes one), the
    frame source, and what is drawn and written. Each field is the run_webcam.py flag of the same name."""

    window: str = "live classifier"
    checkpoint: Path = DEFAULT_CHECKPOINT
    weights: str | None = None  # None: the checkpoint's weights_spec
    seed: int = 0  # for weights="random"
    device: str = "auto"
    onnx: Path | None = None  # an exported classifier (its .json sidecar beside it) instead of --checkpoint
    runtime: str | None = None  # torch, onnxruntime or opencv; None: torch for a checkpoint, else the fastest installed
    export: Path | None = None  # write --checkpoint's classifier as this .onnx (and its sidecar), then stop
    top_k: int = 3
    smooth: int = 1  # average the probabilities over the last N frames
    output: Path | None = None  # annotated video (mp4v)
    predictions: Path | None = None  # one JSON line per frame
    batch_frames: int | None = None  # frames per forward pass; None: 8 for files and folders, a camera always 1
    precision: str = "auto"  # the torch runtime's backbone: auto (measured at its own batch size), fp32, bf16, fp16
    # (checked by the live stage: pipeline.backbones.precision.check_choice)

    def check(self) -> None:
        super().check()
        check_seed(self.seed)
        for name, value in (("--top-k", self.top_k), ("--smooth", self.smooth), ("--batch-frames", self.batch_frames)):
            if value is not None and value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if self.batch_frames is not None and self.batch_frames > MAX_BATCH_FRAMES:
            raise UserError(f"--batch-frames {self.batch_frames} is too large (at most {MAX_BATCH_FRAMES}: a batch "
                            "is held in memory, and 8 already reads the backbone's weights once for all its frames)")
        if self.runtime is not None and self.runtime not in RUNTIMES:
            raise UserError(f"--runtime {self.runtime}: use {', '.join(RUNTIMES)}")
        if self.onnx is not None and self.runtime == "torch":
            raise UserError("--runtime torch runs a --checkpoint; an --onnx graph runs on onnxruntime or opencv")
        if self.onnx is not None and self.export is not None:
            raise UserError("--export writes an .onnx from --checkpoint; drop --onnx")
        if self.export is not None and Path(self.export).suffix.lower() != ".onnx":
            raise UserError(f"--export {self.export}: name the file *.onnx (its sidecar .json goes beside it)")


@dataclass(kw_only=True)
class CollectConfig(FramesConfig):
    """run_webcam.py --collect CLASS --into DIR: frames of the source saved as images of one class
    (pipeline.live.collect); no checkpoint, no torch. Each field is the run_webcam.py flag of the same name."""

    collect: str  # the class: its frames go to INTO/<collect>/
    into: Path | None = None  # the ImageFolder the frames go to (needed: checked)
    every: int = COLLECT_EVERY  # save every N-th frame
    count: int = COLLECT_COUNT  # stop after this many saved
    countdown: float | None = None  # seconds before saving starts; None: COLLECT_COUNTDOWN on a camera, else 0
    window: str = "collect"

    def check(self) -> None:
        super().check()
        if self.into is None:
            raise UserError(f"--collect {self.collect} needs --into DIR: the folder its frames go to (DIR/<class>/)")
        for name, value in (("--every", self.every), ("--count", self.count)):
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if self.countdown is not None and not (0 <= self.countdown <= 3600):
            raise UserError(f"--countdown must be from 0 to 3600 seconds, got {self.countdown}")


SERVE_PORT = 8765  # run_webcam.py --serve: the page's port (0: any free one)
SERVE_HOST = "127.0.0.1"  # --serve listens on the loopback only unless --host says otherwise


@dataclass(kw_only=True)
class ServeConfig:
    """run_webcam.py --serve: the local web app over a project folder (pipeline.app). Each field is the flag of the
    same name; --backbone, --weights and --seed are those of run_extract.py (the page's training uses them)."""

    serve: bool = True
    project: Path = DEFAULT_PROJECT  # the ImageFolder (images/), its trash, the cache and the head runs
    port: int = SERVE_PORT
    host: str = SERVE_HOST
    backbone: str = "alexnet"
    weights: str = "pretrained"
    seed: int = 0

    def check(self) -> None:
        check_seed(self.seed)
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be from 0 (any free port) to 65535, got {self.port}")
        if not self.host.strip():
            raise UserError("--host is empty; leave it out to listen on 127.0.0.1 only")
        if Path(self.project).exists() and not Path(self.project).is_dir():
            raise UserError(f"--project {self.project} is a file; pass a folder (it is created if missing)")


def webcam_config(given: dict) -> LiveConfig | CollectConfig | ServeConfig:
    """The settings of run_webcam.py from the flags typed (``given``: field -> value, those typed only; the config's
    own defaults fill in the rest): collection's with --collect, else live classification's.

    One rule keeps the two apart: a command takes exactly its config's fields, so a flag of the other command is
    one line naming it (``--collect mug --into d --checkpoint x``: "drop --checkpoint")."""
    kind = ServeConfig if "serve" in given else CollectConfig if "collect" in given else LiveConfig
    takes = {field.name for field in fields(kind)}
    foreign = ", ".join(f"--{name.replace('_', '-')}" for name in given if name not in takes)
    if foreign and kind is ServeConfig:
        raise UserError(f"--serve runs the page and takes --project, --port, --host, --backbone, --weights and --seed; "
                        f"drop {foreign}")
    if foreign and kind is CollectConfig:
        raise UserError(f"--collect saves frames and classifies nothing; drop {foreign} "
                        "(or run those without --collect)")
    if foreign:
        raise UserError(f"{foreign} only apply to --collect CLASS or --serve; add one, or drop them")
    return kind(**given)
