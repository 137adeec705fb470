"""``bench_extract --timeline``: where one extraction's time goes, thread by thread (issue #37).

One project extraction (the train split, random weights) runs in this process with each step of its data path
wrapped in a timer that records (thread, step, start, end):
- reader threads: ``read`` (the file's or pack's bytes), ``hash`` (sha256), ``decode``, ``resize`` (and crop);
- the writer thread: ``write`` (a finished shard's file, its rows joined);
- the main thread: ``wait`` (for the next batch from the reader), ``normalize``, ``forward`` (every layer, one
  pass), ``copy`` (the rows to the storage dtype), ``assembly`` (``train.h5``);
- on CUDA, where DataLoader worker processes read and decode (their steps are not seen here, only the main
  thread's ``wait`` for them), a ``gpu`` lane: each batch's work on the device (upload, resize, normalise,
  forward, the rows' copy back), from CUDA events, placed on the host's clock by one synchronised event.
  On CUDA the main thread's ``normalize`` and ``forward`` spans are only the time to queue them.
Reported: each step's seconds and share of the loop's wall time per thread, and a picture of one second of the
steady state, lane per thread (``--timeline`` writes ``extract-timeline-<cpu>-<precision>.png`` beside the JSON).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

STEP_COLOURS = {"read": "#999", "hash": "#c9c", "decode": "#e80", "resize": "#eb3", "wait": "#ddd",
                "normalize": "#3a3", "forward": "#36c", "copy": "#0cc", "write": "#c33", "assembly": "#600",
                "gpu": "#609"}


class Timeline:
    """Spans recorded from any thread: (thread name, step, start, end), perf_counter seconds."""

    def __init__(self):
        self.spans: list[tuple[str, str, float, float]] = []
        self.lock = threading.Lock()
        self.events: list = []  # CUDA: (start, end) events of each batch's device work
        self.origin = None  # CUDA: (an event, the host's perf_counter when it ran)

    def device_work(self, function):
        """``function`` (a batch's device work) between two CUDA events; the first call synchronises once to
        tie the device's clock to the host's."""
        import torch

        def timed(*args, **kwargs):
            if self.origin is None:
                torch.cuda.synchronize()
                origin = torch.cuda.Event(enable_timing=True)
                origin.record()
                origin.synchronize()
                self.origin = (origin, time.perf_counter())
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                return function(*args, **kwargs)
            finally:
                end.record()
                self.events.append((start, end))
        return timed

    def settle(self) -> None:
        """The device's spans, as a ``gpu`` lane on the host's clock (waits for the device)."""
        if not self.events:
            return
        import torch

        torch.cuda.synchronize()
        origin, host = self.origin
        for start, end in self.events:
            self.spans.append(("gpu", "gpu", host + origin.elapsed_time(start) / 1e3,
                               host + origin.elapsed_time(end) / 1e3))
        self.events = []

    def wrap(self, step: str, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                end = time.perf_counter()
                with self.lock:
                    self.spans.append((threading.current_thread().name, step, start, end))
        return timed

    def iterate(self, step: str, iterable):
        """``iterable``'s items, the time spent waiting for each recorded as ``step``."""
        iterator = iter(iterable)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            with self.lock:
                self.spans.append((threading.current_thread().name, step, start, time.perf_counter()))
            yield item


@contextlib.contextmanager
def instrumented(timeline: Timeline, cuda: bool = False):
    """The data path's steps (module attributes, as the extraction looks them up) wrapped in ``timeline``'s timers
    while the block runs; put back after it, so an in-process caller (the GPU check's dry run) keeps the real ones."""
    from features import cache
    from models.backbones import LayerFeatures
    from pipeline.common.preprocess import Preprocess
    from pipeline.datasets import images
    from pipeline.extract import devices, extractor, reading

    real_read_ahead, real_loader = extractor.read_ahead, extractor.DataLoader
    batch = timeline.wrap("batch", extractor._Forward.add)  # the loop's bounds, not drawn
    patches = [(images, "read_bytes", timeline.wrap("read", images.read_bytes)),
               (reading, "decode_rgb", timeline.wrap("decode", reading.decode_rgb)),
               (reading, "hashlib", type("hashlib", (), {"sha256": staticmethod(timeline.wrap("hash", hashlib.sha256))})),
               (Preprocess, "resize_crop", timeline.wrap("resize", Preprocess.resize_crop)),
               (Preprocess, "normalize", timeline.wrap("normalize", Preprocess.normalize)),
               (LayerFeatures, "forward_layers", timeline.wrap("forward", LayerFeatures.forward_layers)),
               (extractor, "HostCopy", timeline.wrap("copy", devices.HostCopy)),
               (cache, "write_shard", timeline.wrap("write", cache.write_shard)),
               (cache, "assemble", timeline.wrap("assembly", cache.assemble)),
               (extractor._Forward, "add", timeline.device_work(batch) if cuda else batch),
               (extractor, "read_ahead",
                lambda reader, threads, **kw: timeline.iterate("wait", real_read_ahead(reader, threads, **kw)))]
    if cuda:  # worker processes: only the wait for them is seen; the device's own work from events
        patches.append((extractor, "DataLoader", lambda *a, **kw: timeline.iterate("wait", real_loader(*a, **kw))))
    saved = {(owner, name): vars(owner).get(name, _INHERITED) for owner, name, _ in patches}  # before any patch
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield timeline
    finally:
        for (owner, name), value in saved.items():
            if value is _INHERITED:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


_INHERITED = object()  # an attribute the patched class did not hold itself


def summarise(timeline: Timeline) -> dict:
    """Seconds and share of the loop (first forward's start to the last forward's end) per thread and step."""
    spans = timeline.spans
    batches = [s for s in spans if s[1] == "batch" or s[1] == "gpu"]  # not auto's timing forwards, before the loop
    if not batches:
        return {"loop_s": 0.0, "batches": 0, "seconds": {}, "share_of_loop": {}}
    loop_start, loop_end = min(s[2] for s in batches), max(s[3] for s in batches)
    wall = loop_end - loop_start
    threads: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for thread, step, start, end in spans:
        if step == "batch":
            continue
        overlap = min(end, loop_end) - max(start, loop_start)
        if overlap > 0:
            threads[_lane(thread)][step] += overlap
    return {"loop_s": round(wall, 3), "batches": sum(s[1] == "batch" for s in batches),
            "seconds": {t: {k: round(v, 3) for k, v in steps.items()} for t, steps in threads.items()},
            "share_of_loop": {t: {k: round(v / wall, 4) for k, v in steps.items()} for t, steps in threads.items()}}


def _lane(thread: str) -> str:
    if thread == "MainThread":
        return "main"
    return thread.replace("extract-read_", "reader ").replace("extract-write_0", "writer")


def draw(timeline: Timeline, path: Path, title: str, window_s: float = 1.0) -> None:
    """One second of the steady state (from the middle of the loop), lane per thread, a colour per step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    forwards = sorted(s[2] for s in timeline.spans if s[1] == "forward")
    start = forwards[len(forwards) // 2]
    lanes = sorted({_lane(s[0]) for s in timeline.spans}, key=lambda t: (t != "gpu", t != "main", t))
    fig, ax = plt.subplots(figsize=(11, 1.8 + 0.5 * len(lanes)))
    for row, lane in enumerate(lanes):
        for thread, step, a, b in timeline.spans:
            if step != "batch" and _lane(thread) == lane and b > start and a < start + window_s:
                ax.broken_barh([(max(a, start) - start, min(b, start + window_s) - max(a, start))], (row - 0.4, 0.8),
                               color=STEP_COLOURS.get(step, "#000"))
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_xlim(0, window_s)
    ax.set_xlabel("seconds (one window of the steady state)")
    ax.set_title(title, fontsize=8)
    steps = {s[1] for s in timeline.spans}
    fig.legend(handles=[Patch(color=c, label=s) for s, c in STEP_COLOURS.items() if s in steps], ncol=11,
               fontsize=7, loc="lower center", frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_timeline(data: Path, out: Path, precision: str, batch: int, workers: int,
                 device: str = "cpu") -> tuple[Timeline, dict]:
    """One extraction of ``data``'s train split into ``out`` with every step timed; the real steps are back after."""
    from pipeline.common.config import ExtractConfig
    from pipeline.datasets.dataset import index_dataset
    from pipeline.extract import extractor

    timeline = Timeline()
    config = ExtractConfig(data=str(data), out=out, weights="random", seed=0, device=device, precision=precision,
                           batch_size=batch, workers=workers, splits=("train",), progress=False)
    start = time.perf_counter()
    with instrumented(timeline, cuda=device.startswith("cuda")):
        result = extractor.extract(config, lambda: data, index_dataset(data)).splits["train"]
        timeline.settle()
    return timeline, {"whole_extract_s": round(time.perf_counter() - start, 3), "rows": result.rows,
                      **summarise(timeline)}


def timeline_json(args, results: dict, out_json: Path, mini: Path) -> int:
    """--timeline (benchmarks.extract_timeline): one timed extraction per precision, a JSON and a picture each."""
    from benchmarks.extract_feed import feed_data

    out_json.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data, results["what"] = (Path(args.data), f"the train split of {args.data}") if args.data else \
            feed_data(args.images, Path(tmp), mini)
        for i, precision in enumerate(args.precisions.split(",")):
            timeline, found = run_timeline(data, Path(tmp) / f"out-{i}", precision, results["batch_size"],
                                           results["workers"], device=results["device"])
            results.setdefault("timeline", {})[precision] = found
            print(f"{precision}: loop {found['loop_s']} s over {found['rows']} images; share of the loop per thread:")
            for lane, steps in found["share_of_loop"].items():
                print(f"  {lane:10s} " + ", ".join(f"{k} {v:.1%}" for k, v in sorted(steps.items(), key=lambda kv: -kv[1])))
            draw(timeline, out_json.with_name(f"{out_json.stem}-{precision}.png"),
                 window_s=1.0 if results["device"] == "cpu" else 0.05, title=f"extraction timeline, {precision}, {results['cpu_kind']}: {results['what']}, batch "
                 f"{results['batch_size']}, {results['workers']} reader thread(s)")
    results["load_average_after"] = os.getloadavg()[0]
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out_json}")
    return 0
