"""`make demo`: an offline tour of all three stages on a small generated dataset.

The backbone has RANDOM weights (nothing is downloaded), so the accuracy it reaches says nothing about
AlexNet: it only shows the stages working end to end. For real results run `make run`.

    python -m pipeline.demo [--out runs/demo]
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from pipeline.data.synthetic import make_tiny_imagenet

log = logging.getLogger("demo")
ROOT = Path(__file__).resolve().parents[1]

BANNER = ("DEMO: the backbone is UNTRAINED (random weights, seed 0) and the images are generated, so the "
          "numbers below only show the pipeline working; they say nothing about AlexNet or Tiny ImageNet.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    data = args.out / "data" / "tiny-imagenet-demo"
    if not (data / "wnids.txt").is_file():
        make_tiny_imagenet(data, num_classes=5, train_per_class=16, val_per_class=4)
    log.info("%s\n", BANNER)
    steps = [
        ("stage one: extract fc7 once", "run_extract.py",
         ["--data", str(data), "--weights", "random", "--seed", "0", "--out", str(args.out / "features")]),
        ("stage two: train the head on the cache", "run_train_head.py",
         ["--features", str(args.out / "features"), "--out", str(args.out / "head"), "--epochs", "10"]),
        ("live: backbone + head on the val images, headless", "run_webcam.py",
         ["--checkpoint", str(args.out / "head" / "best.pt"), "--source", str(data / "val" / "images"),
          "--no-display", "--predictions", str(args.out / "predictions.jsonl"),
          "--output", str(args.out / "annotated.mp4")]),
    ]
    for title, script, script_args in steps:
        # the user's own three commands, run as the user would run them
        log.info("== %s ==\n$ python %s %s", title, script, " ".join(script_args))
        code = subprocess.run([sys.executable, str(ROOT / script), *script_args]).returncode
        if code:
            return code
    log.info("\n%s\nOutputs are in %s: features/, head/ (best.pt, plots, report.md), predictions.jsonl, annotated.mp4",
             BANNER, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
