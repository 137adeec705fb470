"""Stage three: the trained head on the frozen backbone, live on a camera, a video, an image or a folder.

    python run_webcam.py                                       # camera 0 with runs/head/best.pt
    python run_webcam.py --source 1 --width 1280 --height 720 --smooth 5
    python run_webcam.py --source clip.mp4 --no-display --output annotated.mp4 --predictions preds.jsonl
    python run_webcam.py --source clip.mp4 --no-display --batch-frames 4 --predictions preds.jsonl
    python run_webcam.py --source data/tiny-imagenet-200/val/images --max-frames 100 --predictions preds.jsonl
    python run_webcam.py --checkpoint runs/sweep/best.pt --weights alexnet-owt-7be5be79.pth --device cuda

Deploy without torch (pip install -r requirements-deploy.txt for the export and ONNX Runtime):

    python run_webcam.py --checkpoint runs/head/best.pt --export classifier.onnx   # + classifier.json
    python run_webcam.py --onnx classifier.onnx --runtime onnxruntime --source clip.mp4
    python run_webcam.py --onnx classifier.onnx --runtime opencv       # only opencv-python and numpy needed

Teach it your own classes: collect frames per class from the camera (two or more runs, "bursts", per class),
then extract and train on DIR as an ImageFolder dataset:

    python run_webcam.py --collect mug --into data/desk            # camera 0: 60 frames, every 5th, after 3 s
    python run_webcam.py --collect pen --into data/desk --source pen.mp4 --count 30 --every 2

Or teach it in the browser: a local page for your classes, samples and webcam capture (pip install -r
requirements-app.txt), which prints the one address to open:

    python run_webcam.py --serve                                   # project folder runs/app, http://127.0.0.1:8765/
    python run_webcam.py --serve --project runs/desk --port 8800 --weights random

In the window, q or Esc quits; on still images any other key shows the next one.

Video files, images and folders are classified --batch-frames frames per forward pass (default 8; a
camera always 1 at a time): the same probabilities as one at a time, at a higher frame rate. In the
--predictions lines (one per frame: frame, source, topk, latency_ms), latency_ms is the model time of
the frame's batch divided by the frames in it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli import run_main
from pipeline.common.config import (COLLECT_COUNTDOWN, RUNTIMES, SERVE_HOST, SERVE_PORT, CollectConfig, LiveConfig,
                                    ServeConfig, webcam_config)
from pipeline.common.names import IMAGE_SUFFIXES
from pipeline.backbones.precision import PRECISION_CHOICES


def build_parser() -> argparse.ArgumentParser:
    """Every flag is the field of the same name of LiveConfig or, with --collect, CollectConfig. A flag not typed is
    left out of the arguments (argparse.SUPPRESS), so the config's own default applies and a flag of the other
    command can be named (pipeline.common.config.webcam_config)."""
    live, collecting = LiveConfig(), CollectConfig(collect="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    model = p.add_argument_group("model")
    model.add_argument("--checkpoint", type=Path,
                       help=f"head checkpoint from run_train_head.py (default {live.checkpoint})")
    model.add_argument("--weights", help="backbone weights instead of the checkpoint's own spec: pretrained (imagenet), random, "
                                         "or a state_dict path (must match the checkpoint's fingerprint)")
    model.add_argument("--seed", type=int, help="seed for --weights random")
    model.add_argument("--device", help="auto (the default), cpu, cuda or cuda:N (the torch runtime)")
    model.add_argument("--precision", choices=PRECISION_CHOICES,
                       help="the torch runtime's backbone precision (default auto: timed on the first batch of frames)")
    model.add_argument("--batch-frames", type=int, metavar="N",
                       help="frames classified per forward pass for video files, images and folders "
                            "(default 8; a camera is always read one frame at a time)")
    deploy = p.add_argument_group("deploy")
    deploy.add_argument("--export", type=Path, metavar="FILE.onnx",
                        help="write --checkpoint's backbone + head + softmax as one ONNX graph, and FILE.json "
                             "beside it (classes, preprocessing, weights); then stop")
    deploy.add_argument("--onnx", type=Path, metavar="FILE.onnx",
                        help="run an exported graph (its FILE.json beside it) instead of --checkpoint")
    deploy.add_argument("--runtime", choices=RUNTIMES,
                        help="what runs the classifier: torch (--checkpoint), onnxruntime or opencv (--onnx; "
                             "default: onnxruntime when installed, else opencv)")
    source = p.add_argument_group("source and window (live and --collect)")
    source.add_argument("--source", help=f"camera index (default {live.source}), video file, image file, or folder of "
                                         f"images ({' '.join(IMAGE_SUFFIXES)})")
    source.add_argument("--width", type=int, help="requested camera width")
    source.add_argument("--height", type=int, help="requested camera height")
    source.add_argument("--max-frames", type=int, help="stop after this many frames")
    source.add_argument("--no-display", dest="display", action="store_false",
                        help="no window (headless; default: a window when a display is present)")
    source.add_argument("--window", help=f"the window's title (default {live.window!r}; with --collect "
                                         f"{collecting.window!r})")
    out = p.add_argument_group("output")
    out.add_argument("--top-k", type=int, help=f"classes shown and recorded per frame (default {live.top_k})")
    out.add_argument("--smooth", type=int,
                     help=f"average the probabilities over the last N frames (default {live.smooth})")
    out.add_argument("--output", type=Path, help="write the annotated video here (mp4v)")
    out.add_argument("--predictions", type=Path,
                     help="write one JSON line per frame here (latency_ms: its batch's model time / frames in it)")
    collect = p.add_argument_group("collect (teach it your own classes: no checkpoint, no torch; only the source "
                                   "flags above apply)")
    collect.add_argument("--collect", metavar="CLASS",
                         help="save frames of the source as images of CLASS instead of classifying them")
    collect.add_argument("--into", type=Path, metavar="DIR",
                         help="the image folder they go to, as DIR/CLASS/burst-..._00000.jpg (created if needed)")
    collect.add_argument("--every", type=int, metavar="N", help=f"save every N-th frame (default {collecting.every}: "
                                                                "consecutive frames are near-duplicates)")
    collect.add_argument("--count", type=int, metavar="K",
                         help=f"stop after K saved frames (default {collecting.count})")
    collect.add_argument("--countdown", type=float, metavar="S",
                         help=f"seconds before saving starts, to get in place (default {COLLECT_COUNTDOWN:g} on a "
                              "camera, 0 on a video or folder)")
    add_serve_flags(p)
    return p


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """--serve and its flags: the fields of ServeConfig."""
    serve = p.add_argument_group("serve (the local web app; --weights and --seed above apply)")
    serve.add_argument("--serve", action="store_true", help="serve the page for your classes, samples and webcam "
                                                            "capture, and print its address (with its token)")
    serve.add_argument("--project", type=Path, metavar="DIR",
                       help=f"the project folder: images, trash, cache and head runs (default {ServeConfig().project})")
    serve.add_argument("--port", type=int, help=f"the page's port (default {SERVE_PORT}; 0: any free one)")
    serve.add_argument("--host", help=f"the address to listen on (default {SERVE_HOST}: this computer only; another "
                                      "one is reachable from the network, and capture then needs HTTPS)")
    serve.add_argument("--backbone", help="the backbone the page trains on, as run_extract.py names it (default "
                                          f"{ServeConfig().backbone})")


def main(argv: list[str] | None = None) -> int:
    given = vars(build_parser().parse_args(argv))  # the flags typed, and only those

    def body() -> int:
        config = webcam_config(given)
        if isinstance(config, ServeConfig):  # the app composes the stages itself; nothing else imports it
            from pipeline.app.server import serve

            return serve(config)
        from pipeline.commands import live

        return live(config)

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
