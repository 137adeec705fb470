"""An exported classifier's contract, read in one place: the facts its graph carries, its sidecar, and their agreement.

The graph (``classifier.onnx``) carries in its ``metadata_props`` every fact the runtimes use: the class wnids and
names in output order, the input and output names, and the preprocessing (sizes, mode, interpolation, mean, std,
channel order). Those are the truth; the sidecar (``classifier.json``) is a readable copy that must agree field by
field, and its ``onnx_sha256`` must be the graph's. Graphs exported before sidecar format 2 carry no facts: they
run on their sidecar's, with one warning. Torch-free and onnx-free (pipeline.live.onnx_proto reads the graph).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from pipeline.common.errors import UserError, first_line
from pipeline.common.names import ONNX_FORMAT, ONNX_FORMATS_READ
from pipeline.common.preprocess import MAX_IMAGE_SIZE, Preprocess
from pipeline.live.checks import check_memory
from pipeline.live.numpy_preprocess import TAPS
from pipeline.live.onnx_proto import GraphHeader, NotOnnx, read_graph_header

log = logging.getLogger(__name__)

EXPORT = "export it again with run_webcam.py --checkpoint best.pt --export classifier.onnx"
SIDECAR_KEYS = {"format": str, "version": str, "onnx_sha256": str, "input": str, "output": str, "num_classes": int,
                "class_wnids": list, "class_names": list, "preprocess": dict, "weights_spec": str}
FACT_PREFIX = "fc7_transfer."  # the graph's metadata_props keys: FACT_PREFIX + "format", + each of FACTS
CLASS_FACTS = ("class_wnids", "class_names", "input", "output")  # top-level fields of the sidecar
PREPROCESS_FACTS = ("image_size", "resize_size", "mode", "interpolation", "mean", "std", "channel_order")
MAX_SIDECAR_BYTES = 64 * 2**20  # far above any class list; a larger "sidecar" is some other file


def sidecar_path(onnx_path: Path) -> Path:
    return Path(onnx_path).with_suffix(".json")


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (the exported graph is hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def facts_of(meta: dict) -> dict:
    """The facts the runtimes use, from a sidecar (or the dict export writes it from), in the graph's spelling."""
    preprocess = meta["preprocess"]
    defaults = {"interpolation": "bilinear", "channel_order": "RGB"}  # what a sidecar without them means
    return {**{key: meta[key] for key in CLASS_FACTS},
            **{key: preprocess.get(key, defaults.get(key)) for key in PREPROCESS_FACTS}}


def graph_metadata(meta: dict) -> dict[str, str]:
    """The metadata_props export writes into the graph: each fact of ``meta`` (the sidecar), as JSON."""
    return {FACT_PREFIX + "format": ONNX_FORMAT,
            **{FACT_PREFIX + key: json.dumps(value) for key, value in facts_of(meta).items()}}


class NotASidecar(ValueError):
    """A file that is not an exported classifier's sidecar: why, in a few words."""


def load_sidecar(path: Path) -> dict:
    """The JSON of a sidecar file, of a format this version reads: the one place a sidecar is parsed.
    Raises OSError (FileNotFoundError when there is none) or NotASidecar."""
    with open(path, "rb") as f:
        text = f.read(MAX_SIDECAR_BYTES + 1)  # a larger "sidecar" is some other file: never read whole
    if len(text) > MAX_SIDECAR_BYTES:
        raise NotASidecar(f"larger than {MAX_SIDECAR_BYTES // 2**20} MiB")
    try:
        meta = json.loads(text)
    except ValueError as err:
        raise NotASidecar(f"not JSON: {first_line(err)}") from None
    if not isinstance(meta, dict):
        raise NotASidecar(f"a JSON {type(meta).__name__}, not an object")
    if meta.get("format") not in ONNX_FORMATS_READ:
        raise NotASidecar(f"format {str(meta.get('format'))[:60]!r}, where this version reads {ONNX_FORMAT!r}")
    return meta


def is_export_sidecar(path: Path) -> bool:
    """Whether ``path`` is an exported classifier's sidecar (any format this version reads)."""
    try:
        load_sidecar(path)
    except (OSError, NotASidecar):
        return False
    return True


def read_sidecar(onnx_path: Path) -> dict:
    """The sidecar beside ``onnx_path``, checked field by field and against the graph's sha256."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"no exported graph at {onnx_path}; {EXPORT}")
    path = sidecar_path(onnx_path)
    try:
        meta = load_sidecar(path)
    except FileNotFoundError:
        raise UserError(f"{onnx_path} has no sidecar {path} (its classes and preprocessing); {EXPORT}") from None
    except OSError as err:
        raise UserError(f"{path} is not a readable sidecar ({first_line(err)}); {EXPORT}") from None
    except NotASidecar as err:
        raise UserError(f"{path} is not the sidecar of an exported classifier ({err}); {EXPORT}") from None
    for key, kind in SIDECAR_KEYS.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise UserError(f"{path}: {key} is {meta.get(key)!r}, expected a {kind.__name__}; {EXPORT}")
    classes = meta["num_classes"]
    if (classes < 1 or len(meta["class_wnids"]) != classes or len(meta["class_names"]) != classes
            or not all(isinstance(name, str) for name in meta["class_wnids"] + meta["class_names"])):
        raise UserError(f"{path}: its {classes} classes and its class lists do not agree; {EXPORT}")
    if file_sha256(onnx_path) != meta["onnx_sha256"]:
        raise UserError(f"{path} describes another graph than {onnx_path} (its sha256 differs): the classes and "
                        f"preprocessing would be another head's; {EXPORT}")
    return meta


def sidecar_preprocess(meta: dict, path: Path) -> Preprocess:
    """The sidecar's preprocessing, checked: an RGB, NCHW float32 input of a sane size."""
    d = meta["preprocess"]
    try:
        preprocess = Preprocess.from_dict(d)
        ok = (d.get("channel_order", "RGB") == "RGB" and len(preprocess.mean) == 3 and len(preprocess.std) == 3
              and all(float(v) > 0 for v in preprocess.std) and 0 < preprocess.image_size <= MAX_IMAGE_SIZE)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: unusable preprocessing ({first_line(err)}); {EXPORT}") from None
    if not ok:
        raise UserError(f"{path}: unusable preprocessing {d!r}; {EXPORT}")
    if preprocess.interpolation not in TAPS:  # what the numpy port (pipeline.live.numpy_preprocess) resizes
        raise UserError(f"{path}: {preprocess.interpolation} resizing is not ported to the torch-free runtimes yet; "
                        "run this head with --checkpoint on torch")
    check_memory(preprocess, str(path))
    return preprocess


def _graph_facts(header: GraphHeader, onnx_path: Path) -> dict | None:
    """The facts the graph carries (JSON-decoded), or None for a graph exported before they were written."""
    found = header.metadata.get(FACT_PREFIX + "format")
    if found is None:
        return None
    if found != ONNX_FORMAT:
        raise UserError(f"{onnx_path} was exported in format {found!r}, which this version does not read "
                        f"({ONNX_FORMAT}); update this project, or {EXPORT}")
    try:
        return {key: json.loads(header.metadata[FACT_PREFIX + key]) for key in (*CLASS_FACTS, *PREPROCESS_FACTS)}
    except (KeyError, ValueError) as err:
        raise UserError(f"{onnx_path}: its metadata {FACT_PREFIX}* is damaged ({first_line(err)}); {EXPORT}") from None


def _difference(key: str, sidecar, graph) -> str:
    """How the sidecar's value of ``key`` differs from the graph's, in a few words (a class list: where it first
    differs)."""
    where = key if key in CLASS_FACTS else f"preprocess {key}"
    if isinstance(sidecar, list) and isinstance(graph, list) and len(sidecar) == len(graph) and key.startswith("class"):
        index = next(i for i, (a, b) in enumerate(zip(sidecar, graph)) if a != b)
        where, sidecar, graph = f"{where}[{index}]", sidecar[index], graph[index]
    return f"{where} is {_short(sidecar)}, the graph's is {_short(graph)}"


def _short(value) -> str:
    text = repr(value)
    if len(text) <= 120:
        return text
    return f"{text[:100]}... ({len(value)} items)" if isinstance(value, list) else f"{text[:100]}..."


def _check_input(header: GraphHeader, meta: dict, side: int, path: Path, onnx_path: Path) -> None:
    """The graph has the sidecar's input and output, takes (B, 3, S, S) inputs of the ``side`` S the preprocessing
    makes (a dynamic S takes any), and scores as many classes as the sidecar lists."""
    for key, tensors in (("input", header.inputs), ("output", header.outputs)):
        if meta[key] not in tensors:
            raise UserError(f"{path}: {key} is {meta[key]!r}, but the graph {onnx_path.name} has only "
                            f"{', '.join(map(repr, tensors))}; {EXPORT}")
    dims = header.inputs[meta["input"]]
    sides = tuple(dims[2:]) if len(dims) == 4 else ()
    if len(dims) != 4 or dims[1] != 3 or any(isinstance(d, int) and d != side for d in sides):
        raise UserError(f"{path} says the graph takes {side}x{side} images (preprocess image_size {side}), but the "
                        f"graph {onnx_path.name} takes {'x'.join(map(str, dims[1:]))} (input shape {dims}); {EXPORT}")
    scores = header.outputs[meta["output"]]
    if len(scores) == 2 and isinstance(scores[1], int) and scores[1] != len(meta["class_wnids"]):
        raise UserError(f"{path} lists {len(meta['class_wnids'])} classes, but the graph {onnx_path.name} scores "
                        f"{scores[1]}: the sidecar is another head's; {EXPORT}")


def read_export(onnx_path: Path) -> tuple[dict, Preprocess]:
    """(the sidecar with the graph's facts, the checked preprocessing) of an exported graph; one line on any
    disagreement between them."""
    onnx_path = Path(onnx_path)
    meta, path = read_sidecar(onnx_path), sidecar_path(onnx_path)
    try:
        header = read_graph_header(onnx_path)
    except (NotOnnx, OSError) as err:
        raise UserError(f"{onnx_path} is not a readable ONNX graph ({first_line(err)}); {EXPORT}") from None
    facts, copied = _graph_facts(header, onnx_path), facts_of(meta)
    if facts is None:
        log.warning("%s carries no classes or preprocessing of its own (exported before sidecar format %s), so its "
                    "sidecar %s cannot be cross-checked; %s to have them checked", onnx_path, ONNX_FORMAT, path.name,
                    EXPORT)
        facts = copied
    for key, value in facts.items():
        if copied[key] != value:
            difference = _difference(key, copied[key], value)
            raise UserError(f"{path} disagrees with its graph {onnx_path.name}: {difference}; the sidecar was edited, "
                            f"or is another head's; {EXPORT}")
    preprocess = {**meta["preprocess"], **{key: facts[key] for key in PREPROCESS_FACTS}}
    meta = {**meta, **{key: facts[key] for key in CLASS_FACTS}, "preprocess": preprocess}
    checked = sidecar_preprocess(meta, path)
    _check_input(header, meta, checked.image_size, path, onnx_path)
    return meta, checked
