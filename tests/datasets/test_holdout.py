"""The stable val split: a function of each image's path (or its burst), never of the other images."""
import pytest

from pipeline.datasets.holdout import burst_of, frame_name, in_val, new_burst, split_key


def test_split_depends_on_the_path_only():
    paths = [f"cls{i % 3}/img{i:04d}.jpg" for i in range(2000)]
    chosen = {p for p in paths if in_val(p, 0.2)}
    assert 0.15 < len(chosen) / len(paths) < 0.25
    more = paths + [f"cls9/new{i}.jpg" for i in range(500)]
    assert {p for p in more if in_val(p, 0.2)} & set(paths) == chosen  # adding images moves none


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_a_burst_never_straddles(fraction):
    for _ in range(20):
        burst = new_burst()
        frames = [f"mug/{frame_name(burst, i)}" for i in range(30)]
        assert len({in_val(p, fraction) for p in frames}) == 1
        assert {burst_of(p) for p in frames} == {burst}


def test_the_same_burst_name_in_two_classes_is_two_keys():
    name = frame_name("burst-20261130-131500-a1b2", 3)
    assert split_key(f"mug/{name}") != split_key(f"pen/{name}")
    assert burst_of("mug/photo_00001.jpg") is None
