"""The torch-free preprocessing against torch's: its speed per frame, and the exported classifier's answers on real
frames against the torch path's (issue 22's fidelity target: the same top-1 on >= 99.5 % of frames, probabilities
within 1e-4).

    python -m benchmarks.bench_deploy_preprocess --speed-only
    python -m benchmarks.bench_deploy_preprocess --checkpoint runs/head/best.pt --onnx classifier.onnx \\
        --images data/tiny-imagenet-200/val/images --frames 200

Speed: pipeline.live.numpy_preprocess.preprocess_frames against the torch path's Preprocess (torchvision's uint8
resize, crop, normalise), one frame at a time, on a 640x480 webcam frame and a 64x64 Tiny ImageNet image; torch on
one thread and on all, median ms.
Fidelity: run_webcam.py on the first --frames images of --images (sorted), once on torch (--checkpoint, fp32, CPU)
and once per torch-free runtime (--onnx), every class's probability in the --predictions lines; top-1 agreement and
the largest |probability difference|. Then where a difference comes from, on the same frames: the decoders
(torchvision's and OpenCV's: pixels that differ), the preprocessing (the numpy port against torch's on the same
pixels: largest |input difference|), and the graphs (each runtime against torch on identical input tensors).
Writes benchmarks/results/deploy-preprocess-<cpu tag>.json with the CPU kind.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.common.config import LiveConfig
from pipeline.common.hardware import cpu_kind, cpu_tag, describe_cpu
from pipeline.common.preprocess import Preprocess
from pipeline.live.sources import decode_with_opencv, torch_decoder
from pipeline.live.numpy_preprocess import preprocess_frames
from pipeline.live.sidecar import read_sidecar

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FRAMES = {"640x480": (480, 640), "64x64": (64, 64)}


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times)), 3)


def speed(repeats: int = 50) -> dict:
    """Median ms per frame: the numpy port, torch on 1 thread, torch on all; and the ratios."""
    preprocess, rng, threads = Preprocess(), np.random.default_rng(0), torch.get_num_threads()
    out = {}
    for name, (height, width) in FRAMES.items():
        frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        as_torch = lambda: preprocess(torch.from_numpy(frame).permute(2, 0, 1)[None])  # noqa: E731
        row = {"numpy_ms": _median_ms(lambda: preprocess_frames(preprocess, [frame]), repeats)}
        torch.set_num_threads(1)
        row["torch_1_thread_ms"] = _median_ms(as_torch, repeats)
        torch.set_num_threads(threads)
        row[f"torch_{threads}_threads_ms"] = _median_ms(as_torch, repeats)
        row["numpy_over_torch_1_thread"] = round(row["numpy_ms"] / row["torch_1_thread_ms"], 2)
        out[name] = row
    return out


def _predictions(path: Path) -> dict[str, dict[str, float]]:
    """{source: {wnid: probability}} of a --predictions file."""
    rows = (json.loads(line) for line in path.read_text().splitlines())
    return {row["source"]: {t["wnid"]: t["prob"] for t in row["topk"]} for row in rows}


def _run(args: list[str]) -> None:
    """run_webcam.py as a user runs it, in its own process."""
    if subprocess.run([sys.executable, str(ROOT / "run_webcam.py"), *args]).returncode != 0:
        raise SystemExit(f"run_webcam.py {' '.join(args)} failed")


def end_to_end(checkpoint: Path, onnx_path: Path, folder: Path, frames: int, runtimes: list[str], classes: int) -> dict:
    """run_webcam.py on torch and on each runtime over the same frames: top-1 agreement, largest |prob diff|."""
    common = ["--source", str(folder), "--no-display", "--max-frames", str(frames), "--top-k", str(classes)]
    with tempfile.TemporaryDirectory() as tmp:
        reference = Path(tmp) / "torch.jsonl"
        _run(["--checkpoint", str(checkpoint), "--runtime", "torch", "--device", "cpu", "--precision", "fp32",
              *common, "--predictions", str(reference)])
        expected = _predictions(reference)
        out = {}
        for runtime in runtimes:
            got_path = Path(tmp) / f"{runtime}.jsonl"
            _run(["--onnx", str(onnx_path), "--runtime", runtime, *common, "--predictions", str(got_path)])
            got = _predictions(got_path)
            same = sum(max(expected[s], key=expected[s].get) == max(got[s], key=got[s].get) for s in expected)
            diff = max(abs(expected[s][w] - got[s][w]) for s in expected for w in expected[s])
            out[runtime] = {"frames": len(got), "top1_agreement_pct": round(100 * same / len(expected), 2),
                            "max_abs_prob_diff": float(f"{diff:.3g}")}
    return out


def _decoded(paths: list[Path]) -> tuple[list[np.ndarray], int]:
    """(OpenCV's decoded frames, how many of them differ from torchvision's in any pixel)."""
    torch_decode = torch_decoder()
    frames, differ = [], 0
    for path in paths:
        mine, theirs = decode_with_opencv(path), torch_decode(path)
        differ += mine.shape != theirs.shape or not np.array_equal(mine, theirs)
        frames.append(mine)
    return frames, differ


def layers(checkpoint: Path, onnx_path: Path, paths: list[Path], runtimes: list[str]) -> dict:
    """Where a difference would come from: decoding, preprocessing, the graph on identical input tensors."""
    from pipeline.live.onnx_runtimes import onnx_classifier
    from pipeline.live.start import open_classifier

    frames, differ = _decoded(paths)
    model = open_classifier(LiveConfig(checkpoint=checkpoint, runtime="torch", device="cpu", precision="fp32"))
    preprocess = model.preprocess
    inputs = np.concatenate([preprocess_frames(preprocess, frames[i:i + 8]) for i in range(0, len(frames), 8)])
    reference = torch.cat([preprocess(torch.from_numpy(f).permute(2, 0, 1)[None]) for f in frames]).numpy()
    with torch.inference_mode():
        torch_probs = torch.cat([torch.softmax(model.model(torch.from_numpy(inputs[i:i + 8])), dim=1)
                                 for i in range(0, len(inputs), 8)]).numpy()
    out = {"frames": len(frames), "decoded_frames_differing": differ,
           "max_abs_input_diff": float(np.abs(inputs - reference).max()), "graph_on_identical_inputs": {}}
    for runtime in runtimes:
        classifier, _ = onnx_classifier(onnx_path, runtime)
        probs = np.concatenate([classifier.forward(inputs[i:i + 8]) for i in range(0, len(inputs), 8)])
        out["graph_on_identical_inputs"][runtime] = {
            "max_abs_prob_diff": float(f"{np.abs(probs - torch_probs).max():.3g}"),
            "top1_agreement_pct": round(100 * float((probs.argmax(1) == torch_probs.argmax(1)).mean()), 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--onnx", type=Path, help="the checkpoint's export (run_webcam.py --export)")
    parser.add_argument("--images", type=Path, help="a folder of real images (e.g. Tiny ImageNet's val/images)")
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--runtimes", default="onnxruntime,opencv")
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    kind = cpu_kind()
    result = {"what": __doc__.split("\n\n")[2].replace("\n", " "), "cpu_kind": describe_cpu(kind), "cpu": kind,
              "cpu_count": os.cpu_count(), "load_average_before": os.getloadavg()[0], "speed": speed()}
    print(json.dumps(result["speed"], indent=1), flush=True)
    if not args.speed_only:
        if not (args.checkpoint and args.onnx and args.images):
            parser.error("--checkpoint, --onnx and --images are needed (or --speed-only)")
        runtimes = args.runtimes.split(",")
        classes = read_sidecar(args.onnx)["num_classes"]
        paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))[:args.frames]
        result["fidelity"] = {"checkpoint": str(args.checkpoint), "images": str(args.images), "classes": classes,
                              "end_to_end": end_to_end(args.checkpoint, args.onnx, args.images, len(paths),
                                                       runtimes, classes),
                              "layers": layers(args.checkpoint, args.onnx, paths, runtimes)}
        print(json.dumps(result["fidelity"], indent=1))
    out = args.out or RESULTS / f"deploy-preprocess-{cpu_tag(kind)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.speed_only and out.is_file():  # keep the fidelity figures of an earlier full run
        result = {**json.loads(out.read_text()), **{k: v for k, v in result.items() if k != "load_average_before"},
                  "speed_load_average_before": result["load_average_before"]}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
