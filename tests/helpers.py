"""Plain helpers shared by the test modules: command-line arguments, one-line error checks, file states,
and a synthetic feature cache. Fixtures live in ``conftest.py``.

Every test picks its device on purpose: CPU tests pass ``--device cpu`` (so a machine with a GPU runs
them on the CPU too), and tests marked ``gpu`` run only where CUDA is present.
"""
from __future__ import annotations

import csv
import hashlib
import json
import zipfile
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

import run_extract
import run_train_head
from features import cache
from pipeline.common.preprocess import Preprocess
from pipeline.data.synthetic import WORDS

# ---------------------------------------------------------------------------------------------
# Arguments: one name per meaning

CPU_ARGS = ("--device", "cpu")
# Small inputs for a 2-core CPU: 64 px wherever the exact AlexNet transform is not what is being tested.
SMALL_INPUT_ARGS = ("--no-progress", "--image-size", "64", "--resize-size", "72", *CPU_ARGS)
# Fast extraction: a seeded random backbone at SMALL_INPUT_ARGS. The CPU forward pass costs about the same
# per batch whatever its size (fc6 alone is 151 MB of weights to read), so the default batch size is kept.
# --precision fp32: bit-for-bit comparisons hold on every machine (auto may choose bf16 where it is faster;
# tests/test_precision_auto.py covers auto).
FAST_EXTRACT_ARGS = ("--weights", "random", "--seed", "0", *SMALL_INPUT_ARGS, "--precision", "fp32")
# Extraction reading in the main thread (no reader threads or worker processes), and in many tiny shards.
NO_WORKERS_ARGS = ("--workers", "0")
TINY_SHARD_ARGS = ("--shard-size", "2", "--batch-size", "2", *NO_WORKERS_ARGS)
# Head training on a tiny cache: batches of 10 so a few rows still make several steps.
HEAD_BATCH_ARGS = ("--batch-size", "10", "--val-batch-size", "10")
# One quick epoch of a head on the CPU.
QUICK_HEAD_ARGS = (*CPU_ARGS, "--no-progress", *HEAD_BATCH_ARGS, "--epochs", "1")


def extract_args(data: Path, out: Path, *extra: str) -> list[str]:
    """Fast CPU extraction arguments; later options (``extra``) override the FAST_EXTRACT_ARGS defaults."""
    return ["--data", str(data), "--out", str(out), *FAST_EXTRACT_ARGS, *extra]


def extract_into(folder: Path, data: Path, *extra: str) -> Path:
    """A finished cache of ``data`` in a new ``folder/features`` (extract_args; ``extra`` overrides them)."""
    out = folder / "features"
    assert run_extract.main(extract_args(data, out, *extra)) == 0
    return out


def train_quick_head(features: Path, out: Path, *extra: str) -> int:
    """run_train_head.py with QUICK_HEAD_ARGS; later options (``extra``) override them."""
    return run_train_head.main(["--features", str(features), "--out", str(out), *QUICK_HEAD_ARGS, *extra])


def h5_datasets(f) -> dict:
    """Every dataset of an open cache file by its path (``identity/sha256``), and ``features`` (a link) resolved."""
    content = {}
    f.visititems(lambda name, item: content.update({name: item[:]}) if isinstance(item, h5py.Dataset) else None)
    if "features" in f:
        content["features"] = f["features"][:]
    return content


def update_counts(caplog) -> dict[str, tuple[int, int, int]]:
    """{split: (reused, extracted, dropped)} from an incremental update's log lines."""
    counts = {}
    for record in caplog.records:
        message = record.getMessage()
        if "the dataset changed since" in message:
            numbers = message.split(": reused ")[1].replace("extracted ", "").replace("dropped ", "").split(", ")
            counts[message.split(":")[0]] = tuple(int(n) for n in numbers)
    return counts


def zip_dataset(root: Path, zip_path: Path) -> Path:
    """Zip ``root`` the way the official zip is laid out: everything under a top folder named like root."""
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in sorted(Path(root).rglob("*")):
            archive.write(path, Path(root.name) / path.relative_to(root))
    return zip_path


def random_backbone(name: str = "alexnet", seed: int = 0, layers: tuple[str, ...] | None = None,
                    image_size: int | None = None):
    """The backbone ``--backbone NAME --weights random --seed S`` extracts with (pipeline.backbones.Backbone): its
    ``module``, ``fingerprint``, ``weights`` (the recorded spec) and ``dims``."""
    from pipeline.backbones.backbone import open_backbone

    return open_backbone(name, "random", seed=seed, layers=layers, image_size=image_size, progress=False)


# ---------------------------------------------------------------------------------------------
# The one-line errors


def error_line(err: str) -> str:
    """The one 'error: ...' line a failed run printed, with no traceback (log lines may precede it)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def one_error_line(err, *, allow_progress: bool = False) -> str:
    """stderr (a string, or pytest's capsys) is exactly one 'error: ...' line.

    ``allow_progress``: download progress bars may come before it.
    """
    if not isinstance(err, str):
        err = err.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err
    if not allow_progress:
        assert len(lines) == 1, f"stderr is not one line: {err!r}"
    return errors[0]


# ---------------------------------------------------------------------------------------------
# Files and their state


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hash(folder: Path, *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file under ``folder`` (but those named in ``skip``) with the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): file_hash(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip}


def tree_bytes(folder: Path, *, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file under ``folder`` (but those named in ``skip``) with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Subprocesses without torch: the deploy set-up (opencv-python, numpy, onnxruntime)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY_MISSING = ("torch", "torchvision", "h5py")  # what requirements.txt adds to the deploy set-up
BLOCKER = """import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):  # as Python says of a package that is not installed
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Blocker())
"""


def torch_free_env(tmp_path: Path, blocked: tuple[str, ...] = DEPLOY_MISSING) -> dict:
    """The environment of a subprocess in which importing ``blocked`` fails as if it were not installed."""
    folder = tmp_path / "blocker"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER.format(blocked=tuple(blocked)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(ROOT)])
    check = subprocess.run([sys.executable, "-c", f"import {blocked[0]}"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and f"No module named '{blocked[0]}'" in check.stderr  # the blocker works
    return env


# ---------------------------------------------------------------------------------------------
# A synthetic feature cache (no images, no backbone)


def write_synthetic_cache(folder: Path, *, classes: int = 4, train_per_class: int = 20, val_per_class: int = 10,
                          signal: float = 0.08, dim: int = 4096, dtype: str = "float32", dataset: str = "synthetic",
                          backbone: str = "alexnet", layer: str = "fc7") -> Path:
    """A cache of noisy, ReLU'd, badly scaled, offset 'fc7' features: the head learns, but not perfectly.

    Feature scales span three decades and every unit has a large positive offset, so a head whose
    standardization were folded wrongly would score differently on the raw features. ``dataset`` names the
    dataset it records (its root ``/<dataset>`` and signatures), ``backbone`` the backbone, ``layer`` the layer.
    """
    wnids = sorted(WORDS)[:classes]
    names = [WORDS[w].split(",")[0] for w in wnids]
    proto = np.random.default_rng(123).normal(0, 1, (classes, dim))
    scale = 10 ** np.random.default_rng(7).uniform(-2, 1, dim)
    offset = np.random.default_rng(8).uniform(0, 3, dim)
    preprocess = Preprocess(image_size=64, resize_size=72).to_json()
    for split, per_class, seed in (("train", train_per_class, 1), ("val", val_per_class, 2)):
        labels = np.repeat(np.arange(classes), per_class)
        noise = np.random.default_rng(seed).normal(0, 1, (len(labels), dim))
        features = np.maximum((proto[labels] * signal + noise + offset) * scale, 0).astype(dtype)
        settings = cache.CacheSettings(backbone=backbone, layer=layer, weights_fingerprint="f" * 64,
                                       preprocess=preprocess, dtype=dtype, precision="fp32",
                                       dataset_signature=f"{dataset}-{split}")
        parts = cache.parts_folder(folder, split)
        cache.start_parts(parts, settings, batch_size=64, shard_size=len(labels), num_rows=len(labels))
        cache.write_shard(parts, 0, {layer: features}, np.arange(len(labels)), [])
        cache.assemble(cache.Assembly(folder, split, settings, num_shards=1, layers={layer: dim}, layer_order=(layer,),
                                      main=layer),
                       cache.SplitRows(paths=[f"{split}/{i}.JPEG" for i in range(len(labels))], labels=labels.tolist(),
                                       wnids=wnids, names=names,
                                       attrs={"weights_spec": "file:/synthetic.pth", "batch_size": 64,
                                              "shard_size": len(labels), "dataset_root": f"/{dataset}", "versions": "{}",
                                              "class_full_names": "\n".join(WORDS[w] for w in wnids), "world_size": 1}))
    return folder
