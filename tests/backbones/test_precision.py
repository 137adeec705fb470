"""--precision auto: the fastest faithful precision, measured once, recorded, and reused.

Deterministic: the clock is stubbed (a forward's seconds are looked up by its dtype and batch size) and the
CPU's flags are given, so no test depends on this machine's speed or vector units.
"""
from __future__ import annotations

import json
import logging

import h5py
import pytest
import torch
from torch import nn

import pipeline.backbones.precision as precision
import pipeline.extract.extractor as extractor
import pipeline.extract.precision_choice as choice
import run_extract
from pipeline.common.config import ExtractConfig
from pipeline.datasets.dataset import index_dataset
from pipeline.common.errors import UserError
from pipeline.common.preprocess import Preprocess
from pipeline.data.synthetic import make_tiny_imagenet
from pipeline.extract.freshness import quick_up_to_date
from pipeline.extract.loading import settle
from pipeline.live.torch_classifier import TorchClassifier
from tests.conftest import error_line, extract_args
from tests.helpers import random_backbone

NATIVE_BF16 = {"avx2", "avx512f", "avx512_bf16"}


def clock(table: dict) -> callable:
    """A stub of time_forward: seconds by (dtype, rows), or by dtype alone."""
    def time_forward(model, run):
        rows = next(iter(run(model).values())).shape[0]
        return table.get((model.dtype, rows), table.get(model.dtype))
    return time_forward


class TinyBackbone(nn.Module):
    """forward_layers like a backbone's module; ``noisy`` spoils every precision but fp32 (a broken kernel)."""

    def __init__(self, noisy: bool = False):
        super().__init__()
        self.fc7 = nn.Linear(12, 32)
        self.noisy = noisy

    @property
    def dtype(self) -> torch.dtype:
        return self.fc7.weight.dtype

    def forward_layers(self, x, layers):
        out = torch.relu(self.fc7(x.to(self.dtype).flatten(1)))
        if self.noisy and self.dtype != torch.float32:
            out = out + torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.dtype)
        return {"fc7": out}


def tiny_input(dtype):
    return torch.linspace(-1, 1, 4 * 12).reshape(4, 3, 2, 2).to(dtype)


def choose(backbone, table, flags=NATIVE_BF16):
    return precision.choose_precision(backbone, tiny_input, ("fc7",), torch.device("cpu"), timer=clock(table),
                                   flags=flags)


def test_the_fastest_faithful_precision_is_chosen_and_the_log_says_why(caplog):
    caplog.set_level(logging.INFO, logger=precision.__name__)
    slow_bf16 = choose(TinyBackbone(), {torch.float32: 0.6, torch.bfloat16: 1.0})
    assert slow_bf16["chosen"] == "fp32" and slow_bf16["speed"] == {"fp32": 1.0, "bf16": 0.6}
    assert "bf16 0.60x fp32 here: using fp32" in caplog.text
    fast_bf16 = choose(TinyBackbone(), {torch.float32: 1.0, torch.bfloat16: 0.5})
    assert fast_bf16["chosen"] == "bf16" and fast_bf16["cosine"]["bf16"] >= precision.FIDELITY
    assert choose(TinyBackbone(), {torch.float32: 1.0, torch.bfloat16: 1.0})["chosen"] == "fp32"  # a tie: fp32


def test_one_timing_decides_when_far_apart_and_a_close_call_is_timed_again():
    """Far apart (bf16 2x fp32 or more, as on Zen 4 and AMX) one timed forward of each decides; within CLOSE_CALL a
    load spike could decide, so both are timed again and each one's fastest counts."""
    def sequence(table: dict):
        calls = {dtype: 0 for dtype in table}

        def timer(model, run):
            run(model)
            calls[model.dtype] += 1
            return table[model.dtype][calls[model.dtype] - 1]
        return timer, calls

    far, calls = sequence({torch.float32: [1.0], torch.bfloat16: [0.45]})
    record = precision.choose_precision(TinyBackbone(), tiny_input, ("fc7",), torch.device("cpu"), timer=far,
                                        flags=NATIVE_BF16)
    assert record["chosen"] == "bf16" and calls == {torch.float32: 1, torch.bfloat16: 1}
    # a spike slowed fp32's first timing: bf16 looked 1.1x faster, but fp32's second timing is the faster
    close, calls = sequence({torch.float32: [1.0, 0.8], torch.bfloat16: [0.9, 0.95]})
    record = precision.choose_precision(TinyBackbone(), tiny_input, ("fc7",), torch.device("cpu"), timer=close,
                                        flags=NATIVE_BF16)
    assert calls == {torch.float32: 2, torch.bfloat16: 2}
    assert record["chosen"] == "fp32" and record["speed"]["bf16"] == round(0.8 / 0.9, 3)


def test_a_candidate_failing_the_fidelity_guard_is_never_chosen(caplog):
    caplog.set_level(logging.INFO, logger=precision.__name__)
    record = choose(TinyBackbone(noisy=True), {torch.float32: 1.0, torch.bfloat16: 0.1})  # 10x faster, but wrong
    assert record["chosen"] == "fp32" and record["cosine"]["bf16"] < precision.FIDELITY
    assert "but cosine" in caplog.text and "using fp32" in caplog.text


def test_bf16_is_not_timed_without_native_bf16(caplog):
    caplog.set_level(logging.INFO, logger=precision.__name__)

    def never(model, run):
        raise AssertionError("timed")
    record = precision.choose_precision(TinyBackbone(), tiny_input, ("fc7",), torch.device("cpu"), timer=never,
                                     flags={"avx2", "avx512f"})
    assert record["chosen"] == "fp32" and "bf16" in record["skipped"]
    assert "no native bf16" in caplog.text and "using fp32" in caplog.text
    assert precision.candidates("cpu", flags={"amx_bf16"})[0] == ["fp32", "bf16"]
    assert precision.candidates("cpu", flags={"asimd", "bf16"})[0] == ["fp32", "bf16"]  # aarch64
    assert precision.candidates("cuda")[0] == ["fp32", "bf16", "fp16"]


# ---------------------------------------------------------------------------------------------
# extraction: recorded, reused, and the rerun rule


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_tiny_imagenet(tmp_path_factory.mktemp("auto") / "ds", num_classes=2, train_per_class=3,
                              val_per_class=2)


@pytest.fixture
def machine(monkeypatch):
    """Which machine the run is on: "bf16" (native bf16, and bf16 times faster) or "fp32" (no native bf16).
    Counts the timings taken."""
    state = {"timed": 0}

    def on(kind: str) -> None:
        monkeypatch.setattr(precision, "cpu_flags", lambda: NATIVE_BF16 if kind == "bf16" else {"avx2"})
        table = clock({torch.float32: 1.0, torch.bfloat16: 0.5})

        def counted(model, run):
            state["timed"] += 1
            return table(model, run)
        monkeypatch.setattr(precision, "time_forward", counted)
    state["on"] = on
    return state


def auto_args(dataset, out, *extra):
    return extract_args(dataset, out, "--precision", "auto", *extra)


def attrs_of(path):
    with h5py.File(path, "r") as f:
        return dict(f.attrs)


def test_auto_records_its_choice_and_a_rerun_elsewhere_is_up_to_date(dataset, tmp_path, machine, monkeypatch):
    out = tmp_path / "out"
    machine["on"]("bf16")
    assert run_extract.main(auto_args(dataset, out)) == 0
    attrs = attrs_of(out / "train.h5")
    recorded = json.loads(attrs["precision_auto"])
    assert attrs["precision"] == "bf16" and recorded["chosen"] == "bf16" and recorded["speed"]["bf16"] == 2.0
    assert machine["timed"] > 0
    before = (out / "train.h5").read_bytes()

    machine["on"]("fp32")  # another machine: auto would choose fp32 here
    machine["timed"] = 0
    config = ExtractConfig(data=str(dataset), out=out, weights="random", image_size=64, resize_size=72,
                           device="cpu", precision="auto")
    assert quick_up_to_date(config, index_dataset(dataset)) is not None  # the torch-free check agrees
    monkeypatch.setattr("pipeline.extract.freshness.quick_look_applies", lambda config: False)  # the full check too
    assert run_extract.main(auto_args(dataset, out)) == 0
    assert machine["timed"] == 0 and (out / "train.h5").read_bytes() == before

    explicit = ExtractConfig(**{**config.__dict__, "precision": "fp32"})
    assert quick_up_to_date(explicit, index_dataset(dataset)) is None
    assert run_extract.main(extract_args(dataset, out, "--precision", "fp32")) != 0
    assert (out / "train.h5").read_bytes() == before


def test_explicit_precision_says_precision_is_the_difference(dataset, tmp_path, machine, capsys):
    out = tmp_path / "out"
    machine["on"]("bf16")
    assert run_extract.main(auto_args(dataset, out)) == 0
    capsys.readouterr()
    assert run_extract.main(extract_args(dataset, out, "--precision", "fp32")) != 0
    assert "(precision)" in error_line(capsys.readouterr().err)
    machine["timed"] = 0
    assert run_extract.main(extract_args(dataset, out, "--precision", "bf16")) == 0  # exactly what it holds
    assert machine["timed"] == 0


def test_an_added_layer_reuses_the_recorded_choice(dataset, tmp_path, machine):
    out = tmp_path / "out"
    machine["on"]("bf16")
    assert run_extract.main(auto_args(dataset, out)) == 0
    machine["on"]("fp32")
    machine["timed"] = 0
    assert run_extract.main(auto_args(dataset, out, "--layers", "fc6,fc7")) == 0
    attrs = attrs_of(out / "train.h5")
    assert machine["timed"] == 0 and attrs["precision"] == "bf16" and "fc6" in json.loads(attrs["layers"])
    assert json.loads(attrs["precision_auto"])["chosen"] == "bf16"


def test_a_resumed_run_reuses_the_choice_of_the_interrupted_one(dataset, tmp_path, machine, monkeypatch):
    out = tmp_path / "out"
    machine["on"]("bf16")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(extractor, "_assemble", killed)  # shards written, the file never assembled
    assert run_extract.main(auto_args(dataset, out, "--shard-size", "2")) != 0
    monkeypatch.undo()
    assert not (out / "train.h5").exists() and list((out / ".train.parts").glob("shard-*.npz"))
    machine["on"]("fp32")
    machine["timed"] = 0
    assert run_extract.main(auto_args(dataset, out, "--shard-size", "2")) == 0
    attrs = attrs_of(out / "train.h5")
    assert machine["timed"] == 0 and attrs["precision"] == "bf16"
    assert json.loads(attrs["precision_auto"])["speed"]["bf16"] == 2.0  # the measurement travels with the choice


def test_an_old_fp32_cache_without_the_auto_record_is_up_to_date_for_auto(dataset, tmp_path, machine):
    out = tmp_path / "out"
    assert run_extract.main(extract_args(dataset, out, "--precision", "fp32")) == 0
    assert "precision_auto" not in attrs_of(out / "train.h5")
    machine["on"]("bf16")
    before = (out / "train.h5").read_bytes()
    assert run_extract.main(auto_args(dataset, out)) == 0
    assert machine["timed"] == 0 and (out / "train.h5").read_bytes() == before


def test_explicit_precision_skips_the_timing(dataset, tmp_path, machine):
    machine["on"]("bf16")
    assert run_extract.main(extract_args(dataset, tmp_path / "out", "--precision", "bf16")) == 0
    assert machine["timed"] == 0


def test_other_torchrun_ranks_follow_rank_0(dataset, monkeypatch):
    def broadcast(shared, src):
        shared[0] = {"chosen": "bf16", "speed": {"fp32": 1.0, "bf16": 2.0}}
    monkeypatch.setattr(choice.dist, "broadcast_object_list", broadcast)
    monkeypatch.setattr(choice, "measure", lambda *a: pytest.fail("rank 1 measured"))
    config = ExtractConfig(data=str(dataset), out=dataset / "nowhere", precision="auto")
    resolved, record = choice.decide_precision(config, index_dataset(dataset), None, None, torch.device("cpu"), 64,
                                               rank=1, world=2)
    assert resolved.precision == "bf16" and record["chosen"] == "bf16"


# ---------------------------------------------------------------------------------------------
# live: its own choice for its own batch size


def checkpoint(*, made_by_auto: bool) -> dict:
    backbone = random_backbone()
    spec, fingerprint = backbone.weights, backbone.fingerprint
    head = nn.Linear(4096, 2)
    return {"format": "linear-head/1", "head": {"weight": head.weight.detach(), "bias": head.bias.detach()},
            "num_classes": 2, "feature_dim": 4096, "class_wnids": ["n1", "n2"], "class_names": ["a", "b"],
            "backbone": "alexnet", "layer": "fc7", "weights_spec": spec, "weights_fingerprint": fingerprint,
            "preprocess": Preprocess(image_size=64, resize_size=72).to_dict(), "precision": "fp32",
            "precision_auto": made_by_auto, "config": {}, "epoch": 0, "metrics": {}}


def test_live_chooses_for_its_own_batch_size(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: NATIVE_BF16)
    # bf16 wins at batch 1 (weight reads dominate), loses at batch 4
    monkeypatch.setattr(precision, "time_forward", clock({(torch.float32, 1): 1.0, (torch.bfloat16, 1): 0.5,
                                                      (torch.float32, 4): 1.0, (torch.bfloat16, 4): 1.7}))
    frames = [torch.randint(0, 256, (80, 96, 3), dtype=torch.uint8).numpy() for _ in range(4)]
    one = TorchClassifier(checkpoint(made_by_auto=True), weights="random", precision="auto")
    probs = one.predict(frames[:1])
    assert one.precision_record["chosen"] == "bf16" and one.model.backbone.dtype == torch.bfloat16
    assert probs.shape == (1, 2)
    four = TorchClassifier(checkpoint(made_by_auto=True), weights="random", precision="auto")
    four.predict(frames)
    assert four.precision_record["chosen"] == "fp32" and four.model.backbone.dtype == torch.float32


def test_live_keeps_an_explicit_precision_and_an_explicit_cache(monkeypatch):
    monkeypatch.setattr(precision, "time_forward", lambda *a: pytest.fail("timed"))
    frames = [torch.zeros(64, 64, 3, dtype=torch.uint8).numpy()]
    for made_by_auto, requested, expected in ((True, "bf16", torch.bfloat16), (False, "auto", torch.float32)):
        classifier = TorchClassifier(checkpoint(made_by_auto=made_by_auto), weights="random", precision=requested)
        classifier.predict(frames)
        assert classifier.model.backbone.dtype == expected and classifier.precision_record is None


def test_a_bad_precision_is_one_line():
    with pytest.raises(UserError, match="--precision fp8"):
        settle(ExtractConfig(precision="fp8"))


def test_a_candidate_is_the_backbone_cast_without_a_full_precision_copy():
    """auto's candidate (cast_copy) equals copy.deepcopy(backbone).to(dtype): every weight bit for bit, in the same
    layout, in eval mode, with the same features; the fp32 backbone is left as it was."""
    torch.manual_seed(0)
    fp32 = precision.place_backbone(random_backbone().module, torch.device("cpu"), "fp32")
    before = {name: t.clone() for name, t in fp32.state_dict().items()}
    candidate = precision.cast_copy(fp32, torch.bfloat16)
    reference = __import__("copy").deepcopy(fp32).to(dtype=torch.bfloat16)
    assert candidate.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        mine = candidate.state_dict()[name]
        assert mine.dtype == tensor.dtype and mine.stride() == tensor.stride() and torch.equal(mine, tensor), name
        assert mine.data_ptr() != fp32.state_dict()[name].data_ptr()
    assert all(isinstance(p, nn.Parameter) for p in candidate.parameters()) and not candidate.training
    assert all(torch.equal(t, before[name]) and t.dtype == torch.float32 for name, t in fp32.state_dict().items())
    x = torch.rand(2, 3, 64, 64, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    layers = tuple(random_backbone().dims)
    with torch.inference_mode():
        mine, theirs = candidate.forward_layers(x, layers), reference.forward_layers(x, layers)
    assert all(torch.equal(mine[layer], theirs[layer]) for layer in layers)
