"""Stage two: train a head on the cached features (never reads an image), or compare heads in a grid.

    python run_train_head.py                                   # runs/features -> runs/head (linear on fc7)
    python run_train_head.py --features runs/features --device cuda --epochs 20
    python run_train_head.py --lr 0.1,0.01,0.001 --weight-decay 0,1e-4 --out runs/sweep
    python run_train_head.py --head logreg --layer fc6 --weight-decay 1e-2,1e-3,1e-4 --out runs/logreg
    python run_train_head.py --layer pool5,fc6,fc7 --head linear,logreg,knn --shots 5,all --out runs/grid

Heads: linear (SGD, the seed recipe), logreg (L-BFGS logistic regression, the best of the --weight-decay
list by val top-1), knn (DINO's weighted kNN, every --k). Comma lists make a grid: one folder per
combination, experiments.csv/.md/.png, and the best linear or logreg head copied to <out>/best.pt.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.cli import run_main
from pipeline.common.config import HEADS, HeadConfig

log = logging.getLogger("run_train_head")


def float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None


def name_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def shots_list(text: str) -> tuple[int | None, ...]:
    try:
        return tuple(None if v.strip().lower() == "all" else int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected images per class or 'all', separated by commas, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = HeadConfig()  # every default comes from here
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=Path, default=d.features, help="cache folder from run_extract.py")
    p.add_argument("--out", type=Path, default=d.out, help="run folder (best.pt, last.pt, plots, report)")
    p.add_argument("--head", type=name_list, default=d.heads, help=f"{' | '.join(HEADS)}; a comma list compares them")
    p.add_argument("--layer", type=name_list, default=d.layers, help="cached layer: pool5, fc6, fc7; a comma list compares them")
    p.add_argument("--shots", type=shots_list, default=d.shots,
                   help="train images per class (drawn with --seed), or all; a comma list compares them")
    p.add_argument("--lr", type=float_list, default=d.lrs, help="linear: learning rate; a comma list sweeps")
    p.add_argument("--weight-decay", type=float_list, default=None,
                   help=f"linear: SGD weight decay, a comma list sweeps (default {','.join(map(str, d.weight_decays))}); "
                        "logreg: the L2 penalties tried, warm-started strongest first, best by val top-1 kept "
                        f"(default {','.join(map(str, d.logreg_weight_decays))})")
    p.add_argument("--max-iter", type=int, default=d.logreg_max_iter, help="logreg: L-BFGS iterations per penalty")
    p.add_argument("--k", type=int_list, default=d.ks, help="knn: neighbours; every k is reported from one search")
    p.add_argument("--temperature", type=float, default=d.knn_temperature, help="knn: votes are exp(similarity / T)")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="train batch size")
    p.add_argument("--val-batch-size", type=int, default=d.val_batch_size)
    p.add_argument("--seed", type=int, default=d.seed, help="head init, batch order and the --shots draw")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=d.standardize,
                   help="z-score with train statistics, folded into the saved layer (--no-standardize: the raw recipe)")
    p.add_argument("--stream", action="store_true", default=bool(d.stream),
                   help="stream features from disk even if they fit in memory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def train(args: argparse.Namespace) -> int:
    from pipeline.heads.grid import run_experiments

    d = HeadConfig()
    given = args.weight_decay is not None  # one --weight-decay list serves linear (a sweep) and logreg (its path)
    config = HeadConfig(features=args.features, out=args.out, heads=args.head, layers=args.layer, shots=args.shots,
                        lrs=args.lr, weight_decays=args.weight_decay if given else d.weight_decays,
                        logreg_weight_decays=args.weight_decay if given else d.logreg_weight_decays,
                        logreg_max_iter=args.max_iter, ks=args.k, knn_temperature=args.temperature,
                        momentum=args.momentum, epochs=args.epochs, batch_size=args.batch_size,
                        val_batch_size=args.val_batch_size, seed=args.seed, device=args.device,
                        standardize=args.standardize, stream=True if args.stream else None,
                        progress=not args.no_progress)
    experiments = run_experiments(config)
    if experiments.head_result is None or len(experiments.rows) > len(experiments.head_result.runs):
        log.info("%-6s %-7s %-44s %-6s %8s %8s %7s %8s", "layer", "head", "hyper-parameters", "shots", "top-1", "top-5",
                 "train", "seconds")
        for r in experiments.rows:
            log.info("%-6s %-7s %-44s %-6s %7.2f%% %7.2f%% %7d %8.1f", r.layer, r.head, r.params, r.shots, r.val_top1,
                     r.val_top5, r.train_images, r.seconds)
        if experiments.best:
            log.info("best head: %s", experiments.best)
        _warn_random(experiments.weights_spec)
        return 0
    result = experiments.head_result
    if len(result.runs) > 1:
        log.info("%-22s %8s %8s %6s", "head", "top-1", "top-5", "epoch")
        for r in result.runs:
            log.info("%-22s %7.2f%% %7.2f%% %6d", r.name, r.best_val_top1, r.best_val_top5, r.best_epoch)
    best = result.runs[0]
    log.info("best head: %s  val top-1 %.2f%% (epoch %d)", result.best, best.best_val_top1, best.best_epoch)
    _warn_random(result.weights_spec)
    return 0


def _warn_random(weights_spec: str) -> None:
    from pipeline.common.weights import is_random

    if is_random(weights_spec):
        log.warning("NOTE: the features came from a RANDOM backbone (%s): accuracy is not meaningful", weights_spec)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: train(args))


if __name__ == "__main__":
    raise SystemExit(main())
