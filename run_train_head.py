"""Stage two: train a head on the cached features (never reads an image), or compare heads in a grid.

    python run_train_head.py                                   # runs/features -> runs/head (linear on fc7)
    python run_train_head.py --features runs/features --device cuda --epochs 20
    python run_train_head.py --lr 0.1,0.01,0.001 --weight-decay 0,1e-4 --out runs/sweep
    python run_train_head.py --head logreg --layers fc6 --weight-decay 1e-2,1e-3,1e-4 --out runs/logreg
    python run_train_head.py --layers pool5,fc6,fc7 --head linear,logreg,knn --shots 5,all --out runs/grid
    python run_train_head.py --features runs/features,runs/features-resnet50 --head logreg --out runs/backbones
    python run_train_head.py --head logreg --weight-decay sweep:45 --out runs/probe    # Kornblith et al.'s probe
    python run_train_head.py --table runs/probe runs/backbones --out runs/results      # one table of every result
    python run_train_head.py --features runs/features-open_clip-ViT-B-32-laion2b_s34b_b79k --head zeroshot,logreg

Heads: linear (SGD, the seed recipe), logreg (L-BFGS logistic regression over the --weight-decay list or a C
sweep), knn (DINO's weighted kNN, every --k), zeroshot (CLIP's zero-shot classifier from the class names and 80
prompt templates, on an open_clip cache: no train image used, 0 shots). Hyper-parameters are chosen on 10% of the train rows held out
(--select train-split), then refit on all of them; the seed recipe's plain linear head keeps its best epoch by
val (--select val). Comma lists make a grid: one folder per combination, experiments.csv/.md/.png, and the best
linear or logreg head copied to <out>/best.pt. Every fit writes a result.json; --table gathers them.
Each flag sets the HeadConfig field of its name (--layer is an alias of --layers).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli import comma_list, run_main, shots
from pipeline.common.config import LINEAR_WEIGHT_DECAY, LOGREG_WEIGHT_DECAY, SELECTIONS, HeadConfig


float_list = comma_list(float, "numbers")
int_list = comma_list(int, "whole numbers")
name_list = comma_list()
shots_list = comma_list(shots, "images per class or 'all'")


def weight_decays(text: str) -> tuple[float, ...] | str:
    """--weight-decay: a comma list of numbers, or a C sweep's text (sweep:N, logspace:A:B:N; HeadConfig checks it)."""
    return text.strip() if text.strip().startswith(("sweep:", "logspace:")) else float_list(text)


def build_parser() -> argparse.ArgumentParser:
    d = HeadConfig()  # every default comes from here
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=Path, default=d.features,
                   help="cache folder from run_extract.py; a comma list of caches of one dataset compares backbones")
    p.add_argument("--out", type=Path, default=d.out, help="run folder (best.pt, last.pt, plots, report)")
    p.add_argument("--head", type=name_list, default=d.head,
                   help="linear | logreg | knn | zeroshot (open_clip caches only); a comma list compares them")
    p.add_argument("--layers", "--layer", dest="layers", type=name_list, default=d.layers,
                   help="cached layer (default: the default layer of the cache's backbone, fc7 for the default "
                        "backbone, penultimate elsewhere): any layer run_extract.py --layers cached; a comma list "
                        "compares them")
    p.add_argument("--shots", type=shots_list, default=d.shots,
                   help="train images per class (drawn with --seed), or all; a comma list compares them")
    p.add_argument("--lr", type=float_list, default=d.lr, help="linear: learning rate; a comma list sweeps")
    p.add_argument("--weight-decay", type=weight_decays, default=d.weight_decay,
                   help=f"linear: SGD weight decay, a comma list sweeps (default {','.join(map(str, LINEAR_WEIGHT_DECAY))}); "
                        "logreg: the L2 penalties tried, warm-started strongest first "
                        f"(default {','.join(map(str, LOGREG_WEIGHT_DECAY))}), or a C sweep: sweep:45 (C = "
                        "10^linspace(-6, 5, 45), weight decay 1/(n C)) or logspace:A:B:N")
    p.add_argument("--max-iter", type=int, default=d.max_iter, help="logreg: at most this many L-BFGS iterations per penalty (a guard: each is solved to its optimum; hitting it is logged)")
    p.add_argument("--k", type=int_list, default=d.k, help="knn: neighbours; every k is reported from one search")
    p.add_argument("--temperature", type=float, default=d.temperature, help="knn: votes are exp(similarity / T)")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="train batch size")
    p.add_argument("--val-batch-size", type=int, default=d.val_batch_size)
    p.add_argument("--seed", type=int, default=d.seed, help="head init, batch order and the --shots draw")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=d.standardize,
                   help="z-score with train statistics, folded into the saved layer (--no-standardize: the raw recipe)")
    p.add_argument("--stream", action="store_const", const=True, default=d.stream,
                   help="stream features from disk even if they fit in memory")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--select", choices=SELECTIONS, default=d.select,
                   help="what chooses the hyper-parameters (weight decay or C, k, lr and epochs): train-split (held-out "
                        "train rows, then a refit on all; the default for logreg, knn and a linear sweep) or val (the "
                        "default for the plain linear head: its best epoch by val)")
    p.add_argument("--select-fraction", type=float, default=d.select_fraction,
                   help="train-split: the share of each class's train rows held out (at least one per class)")
    p.add_argument("--skip-existing", action=argparse.BooleanOptionalAction, default=d.skip_existing,
                   help="train nothing whose result.json in --out matches the caches and settings (default: on in "
                        "grids and sweeps)")
    p.add_argument("--class-prompts", type=Path, default=d.class_prompts, metavar="FILE",
                   help="zeroshot: the class names the templates are filled with, one line per class in the cache's "
                        "class order (default: the cache's names, '_' read as a space)")
    p.add_argument("--weights", default=d.weights, metavar="FILE",
                   help="zeroshot: the CLIP weights of the text tower, a state_dict file of the cache's model "
                        "(default: the weights the cache records; the fingerprint must match)")
    p.add_argument("--table", nargs="+", type=Path, default=d.table, metavar="DIR",
                   help="train nothing: gather every result.json below these folders into --out's results.csv, .md "
                        "and .png")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def train() -> int:
        from pipeline.commands import train_head

        return train_head(HeadConfig(**vars(args)))

    return run_main(train)


if __name__ == "__main__":
    raise SystemExit(main())
