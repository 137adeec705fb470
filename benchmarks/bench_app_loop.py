"""The page's loop, timed as a user drives it (#35): record, Train, the first live bars; then a fourth class.

    python -m benchmarks.bench_app_loop                    # 3 classes x 60 frames at 640x480, random weights
    python -m benchmarks.bench_app_loop --frames 60 --live-seconds 10

``run_webcam.py --serve --weights random`` runs in a child process (the default backbone and precision: what a user
gets); Playwright drives Debian's chromium with a fake 640x480 camera per class (a .y4m of a coloured shape moving
over a noisy background; one browser per class, as the fake camera loops one file). Each class is recorded with the
page's Hold to record button at 10 frames per second, in two bursts (so the val split holds one out). Then:

1. last captured frame -> first live prediction: press Train (the incremental extraction and the linear head, in
   the server's process: torch is imported once), wait for Done, press Start live, wait for the first bars;
2. the live frames per second the page shows, after ``--live-seconds`` of live;
3. a fourth class: recorded the same way, then step 1 again (only its frames pass through the backbone).

Targets (issue 35): step 1 <= 10 s, the fourth class <= 5 s, on 2 CPU cores. Needs the app extra
(requirements-app.txt) and chromium. Writes benchmarks/results/app-loop-<cpu tag>.json with the CPU kind and the
load average (the figures are only comparable on quiet cores).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from pipeline.common.hardware import cpu_kind, cpu_tag, describe_cpu

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPES = {"circle": (40, 40, 230), "square": (40, 200, 40), "triangle": (230, 90, 30), "cross": (30, 220, 240)}
WIDTH, HEIGHT = 640, 480


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=60, help="frames per class (two bursts)")
    parser.add_argument("--live-seconds", type=float, default=10.0, help="live run before the frame rate is read")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the project here (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=None, help="the result .json")
    parser.add_argument("--shots", type=Path, default=None, help="save a screenshot of each step here")
    return parser


def draw(shape: str, index: int, rng) -> np.ndarray:
    frame = rng.integers(90, 140, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    cx, cy, color = 200 + 6 * index % 240, 160 + 4 * index % 160, SHAPES[shape]
    if shape == "circle":
        cv2.circle(frame, (cx, cy), 90, color, -1)
    elif shape == "square":
        cv2.rectangle(frame, (cx - 80, cy - 80), (cx + 80, cy + 80), color, -1)
    elif shape == "triangle":
        cv2.fillPoly(frame, [np.array([[cx, cy - 100], [cx - 100, cy + 80], [cx + 100, cy + 80]])], color)
    else:
        cv2.line(frame, (cx - 90, cy), (cx + 90, cy), color, 30)
        cv2.line(frame, (cx, cy - 90), (cx, cy + 90), color, 30)
    return frame


def write_y4m(path: Path, shape: str, frames: int = 40) -> Path:
    rng = np.random.default_rng(len(shape))
    with open(path, "wb") as out:
        out.write(f"YUV4MPEG2 W{WIDTH} H{HEIGHT} F30:1 Ip A1:1 C420jpeg\n".encode())
        for index in range(frames):
            out.write(b"FRAME\n" + cv2.cvtColor(draw(shape, index, rng), cv2.COLOR_BGR2YUV_I420).tobytes())
    return path


class Server:
    def __init__(self, project: Path):
        self.process = subprocess.Popen([sys.executable, str(ROOT / "run_webcam.py"), "--serve", "--project",
                                         str(project), "--port", "0", "--weights", "random"], cwd=ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.url = self.process.stdout.readline().strip()
        if not self.url:
            raise SystemExit("the server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


class Driver:
    """One browser per class (its fake camera), driving the page as a user does."""

    def __init__(self, playwright, url: str, chromium: str, shots: Path | None):
        self.playwright, self.url, self.chromium, self.shots = playwright, url, chromium, shots
        self.browser = self.page = None

    def open(self, camera: Path):
        if self.browser:
            self.browser.close()
        self.browser = self.playwright.chromium.launch(executable_path=self.chromium, args=[
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={camera}", "--no-sandbox"])
        self.page = self.browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.goto(self.url)
        self.page.wait_for_function("() => document.querySelector('#camera').videoWidth > 0", timeout=60_000)
        self.page.select_option("#rate", "10")

    def shot(self, name: str) -> None:
        if self.shots:
            self.shots.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(self.shots / f"bench-{name}.png"), full_page=True)

    def record(self, name: str, frames: int) -> None:
        """Add the class, hold its Record button for two bursts of frames/2."""
        page = self.page
        page.fill("#new-class", name)
        page.click("#add-form button")
        card = f'.card[data-name="{name}"]'
        page.wait_for_selector(f"{card} .record:not([disabled])", timeout=30_000)
        for burst in range(2):
            target = -(-frames // 2) * (burst + 1)
            page.hover(f"{card} .record")
            page.mouse.down()
            page.wait_for_function(f"""() => parseInt(document.querySelector('{card} .count').textContent) >= {target}""",
                                   timeout=120_000)
            page.mouse.up()
            page.wait_for_function("() => document.querySelector('#message').textContent.includes('recorded')",
                                   timeout=30_000)
            page.evaluate("() => { document.querySelector('#message').textContent = ''; }")

    def train_to_live(self) -> dict:
        """From now (the last frame saved) to the first live bars; the phases' seconds."""
        page = self.page
        start = time.perf_counter()
        page.click("#train")
        page.wait_for_function("() => document.querySelector('#train-line').textContent.startsWith('Done')",
                               timeout=600_000)
        trained = time.perf_counter()
        page.evaluate("() => { document.querySelector('#bars').replaceChildren(); }")
        page.click("#live-toggle")
        page.wait_for_function("() => document.querySelectorAll('#bars .bar').length > 0", timeout=120_000)
        live = time.perf_counter()
        return {"seconds": round(live - start, 2), "train_seconds": round(trained - start, 2),
                "first_live_seconds": round(live - trained, 2)}

    def live_fps(self, seconds: float) -> float:
        self.page.wait_for_timeout(seconds * 1000)
        fps = float(self.page.locator("#live-line").get_attribute("data-fps") or 0)
        self.page.click("#live-toggle")
        return fps


def loop(work: Path, options: argparse.Namespace, chromium: str) -> dict:
    from playwright.sync_api import sync_playwright

    cameras = {shape: write_y4m(work / f"{shape}.y4m", shape) for shape in SHAPES}
    server = Server(work / "project")
    try:
        with sync_playwright() as playwright:
            driver = Driver(playwright, server.url, chromium, options.shots)
            for shape in list(SHAPES)[:3]:
                driver.open(cameras[shape])
                driver.record(shape, options.frames)
            three = driver.train_to_live()
            fps = driver.live_fps(options.live_seconds)
            driver.shot("three-classes-live")
            driver.open(cameras["cross"])
            driver.record("cross", options.frames)
            four = driver.train_to_live()
            fps_four = driver.live_fps(options.live_seconds)
            driver.shot("four-classes-live")
            driver.browser.close()
    finally:
        server.stop()
    return {"three_classes": three, "live_fps": fps, "fourth_class": four, "live_fps_four_classes": fps_four}


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("no chromium to drive (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="app-loop-") as tmp:
        work = options.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        load_before = os.getloadavg()[0]
        steps = loop(work, options, chromium)
    record = {"benchmark": "app_loop", "cpu": describe_cpu(), "cpu_kind": cpu_kind(), "cores": os.cpu_count(),
              "load_average_1min_before": round(load_before, 2), "load_average_1min_after": round(os.getloadavg()[0], 2),
              "frames_per_class": options.frames, "resolution": f"{WIDTH}x{HEIGHT}", "weights": "random",
              "precision": "auto (the default)", **steps,
              "targets": {"three_classes_seconds": 10, "fourth_class_seconds": 5}}
    out = options.out or RESULTS / f"app-loop-{cpu_tag()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    print(f"last frame -> first live prediction: {steps['three_classes']['seconds']:.1f} s (target <= 10 s); "
          f"fourth class: {steps['fourth_class']['seconds']:.1f} s (target <= 5 s); live {steps['live_fps']:.1f} "
          f"frames/s; on {describe_cpu()}, {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
