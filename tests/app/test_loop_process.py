"""Training in run_webcam.py --serve as a user runs it: a kill of the server in the middle of a training loses no
image and no finished head, and the next server's training resumes and finishes."""
from __future__ import annotations

import time

import pytest

from tests.app.conftest import NO_EXTRA, images_of
from tests.app.test_loop import fill
from tests.app.test_server_process import get, post

pytest.importorskip("uvicorn", reason=NO_EXTRA)

pytestmark = pytest.mark.e2e


def until(server, done, timeout=240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = get(server, "/api/train")
        if done(state):
            return state
        time.sleep(0.1)
    raise AssertionError(f"the training did not get there: {state}")


def test_a_kill_mid_training_loses_nothing_and_the_next_training_resumes(server, project_dir):
    fill(project_dir)
    images = {name: images_of(project_dir, name) for name in ("mug", "pen")}
    first = server()
    assert post(first, "/api/train", {"epochs": 2})["started"]
    assert until(first, lambda s: s["state"] != "running")["state"] == "done"
    best = project_dir / "heads" / "linear" / "best.pt"
    finished = best.read_bytes()
    assert post(first, "/api/train", {"epochs": 1000})["started"]
    until(first, lambda s: len(s["epochs"]) >= 2)  # in the middle of the head's epochs
    first.stop(kill=True)
    assert best.read_bytes() == finished  # the finished head is as it was
    assert {name: images_of(project_dir, name) for name in images} == images
    second = server()  # the same folder: the kill's lock and staging are left behind, and recovered
    assert post(second, "/api/train", {"epochs": 2})["started"]
    state = until(second, lambda s: s["state"] != "running")
    assert state["state"] == "done", state
    assert get(second, "/api/evaluate")["images"] > 0
    assert not list(best.parent.glob(".staging*"))
