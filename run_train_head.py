"""Stage two: train the linear head on the cached fc7 features (never reads an image).

    python run_train_head.py                                   # runs/features -> runs/head
    python run_train_head.py --features runs/features --device cuda --epochs 20
    python run_train_head.py --lr 0.1,0.01,0.001 --weight-decay 0,1e-4 --out runs/sweep
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.cli import run_main
from pipeline.config import HeadConfig

log = logging.getLogger("run_train_head")


def float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = HeadConfig()  # every default comes from here
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=Path, default=d.features, help="cache folder from run_extract.py")
    p.add_argument("--out", type=Path, default=d.out, help="run folder (best.pt, last.pt, plots, report)")
    p.add_argument("--lr", type=float_list, default=d.lrs, help="learning rate; a comma list sweeps")
    p.add_argument("--weight-decay", type=float_list, default=d.weight_decays, help="weight decay; a comma list sweeps")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="train batch size")
    p.add_argument("--val-batch-size", type=int, default=d.val_batch_size)
    p.add_argument("--seed", type=int, default=d.seed, help="head init and batch order")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=d.standardize,
                   help="z-score with train statistics, folded into the saved layer (--no-standardize: the raw recipe)")
    p.add_argument("--stream", action="store_true", default=bool(d.stream),
                   help="stream features from disk even if they fit in memory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def train(args: argparse.Namespace) -> int:
    from pipeline.train_head import train_heads

    config = HeadConfig(features=args.features, out=args.out, lrs=args.lr, weight_decays=args.weight_decay,
                        momentum=args.momentum, epochs=args.epochs, batch_size=args.batch_size,
                        val_batch_size=args.val_batch_size, seed=args.seed, device=args.device,
                        standardize=args.standardize, stream=True if args.stream else None,
                        progress=not args.no_progress)
    result = train_heads(config)
    if len(result.runs) > 1:
        log.info("%-22s %8s %8s %6s", "head", "top-1", "top-5", "epoch")
        for r in result.runs:
            log.info("%-22s %7.2f%% %7.2f%% %6d", r.name, r.best_val_top1, r.best_val_top5, r.best_epoch)
    best = result.runs[0]
    log.info("best head: %s  val top-1 %.2f%% (epoch %d)", result.best, best.best_val_top1, best.best_epoch)
    if result.weights_spec.startswith("random"):
        log.warning("NOTE: the features came from a RANDOM backbone (%s): accuracy is not meaningful", result.weights_spec)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: train(args))


if __name__ == "__main__":
    raise SystemExit(main())
