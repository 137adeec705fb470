"""The loop through the API: train (one at a time, watched, cancelled, resumed), evaluate (the confusion matrix and
its cells' images), live (the bars are the live classifier's probabilities for those frames), export (the graph
as --export writes it, and the dataset as a zip)."""
from __future__ import annotations

import io
import time
import zipfile

import cv2
import numpy as np
import pytest

from tests.app.conftest import NO_EXTRA, PORT, TOKEN, jpeg

pytest.importorskip("starlette", reason=NO_EXTRA)
pytest.importorskip("httpx2", reason=NO_EXTRA)

# small inputs, fp32 everywhere (bit-comparable), a few epochs: the stages' defaults otherwise
FAST = {"extract": {"image_size": 64, "resize_size": 72, "precision": "fp32", "device": "cpu", "workers": 0},
        "head": {"epochs": 3, "batch_size": 10, "val_batch_size": 10, "device": "cpu"}}
CLASSES = ("mug", "pen")
WS = f"ws://127.0.0.1:{PORT}"


def loop_client(folder):
    from starlette.testclient import TestClient

    from pipeline.app.project import Project
    from pipeline.app.routes import Settings, build_app

    settings = Settings(port=PORT, weights="random", precision="fp32", **FAST)
    client = TestClient(build_app(Project(folder).open(), TOKEN, settings), base_url=f"http://127.0.0.1:{PORT}")
    assert client.get(f"/?token={TOKEN}").status_code == 200
    return client


def fill(folder, classes=CLASSES, per_burst=3, bursts=3):
    """Images as --collect writes them: bursts of frames per class."""
    for label, name in enumerate(classes):
        target = folder / "images" / name
        target.mkdir(parents=True, exist_ok=True)
        for b in range(bursts):
            for i in range(per_burst):
                (target / f"{name}-b{b}_{i:04d}.jpg").write_bytes(jpeg(label, b * per_burst + i))


def finish(client, timeout=120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.get("/api/train").json()
        if state["state"] != "running":
            return state
        time.sleep(0.05)
    raise AssertionError("training did not finish")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loop") / "project"
    fill(folder)
    client = loop_client(folder)
    first = client.post("/api/train", json={})
    second = client.post("/api/train", json={})  # another tab: sees the running one, starts nothing
    assert first.status_code == 202 and first.json()["started"]
    assert second.status_code == 200 and not second.json()["started"] and second.json()["run"] == first.json()["run"]
    state = finish(client)
    assert state["state"] == "done", state
    return folder, client, state


def test_train_reports_progress_and_curves_and_publishes_a_head(trained):
    folder, client, state = trained
    assert state["progress"] == 1.0 and state["run"] == 1
    assert [e["epoch"] for e in state["epochs"]][-3:] == [1, 2, 3]
    assert all(np.isfinite(e["train_loss"]) for e in state["epochs"])
    assert (folder / "heads" / "linear" / "best.pt").is_file() and (folder / "features" / "train.h5").is_file()
    with client.websocket_connect(f"{WS}/api/train/watch") as watch:  # a page opened later sees the same state
        assert watch.receive_json()["run"] == 1


def test_evaluate_gives_the_matrix_and_each_cells_images(trained):
    folder, client, _ = trained
    result = client.get("/api/evaluate").json()
    matrix = np.array(result["matrix"])
    assert result["classes"] == list(CLASSES) and matrix.shape == (2, 2)
    assert matrix.sum() == result["images"] > 0
    assert [c["images"] for c in result["per_class"]] == matrix.sum(1).tolist()
    for cell, items in result["cells"].items():
        true, pred = map(int, cell.split(","))
        assert len(items) == matrix[true, pred]
        for item in items:  # each one's thumbnail is served
            assert client.get(f"/api/classes/{item['class']}/samples/{item['name']}").status_code == 200
    assert client.get("/api/evaluate?split=../x").status_code == 400


def test_live_bars_are_the_classifiers_probabilities(trained):
    from pipeline.common.config import LiveConfig
    from pipeline.live.start import open_classifier

    folder, client, _ = trained
    classifier = open_classifier(LiveConfig(checkpoint=folder / "heads" / "linear" / "best.pt", precision="fp32"))
    frames = [jpeg(label, 50 + label, size=96) for label in (0, 1, 0)]
    with client.websocket_connect(f"{WS}/api/live") as live:
        for number, frame in enumerate(frames, 1):  # one at a time: none is stale
            live.send_bytes(frame)
            answer = live.receive_json()
            assert answer["frame"] == number
            rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(frame, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            expected = classifier.predict([rgb])[0]
            assert answer["names"] == list(CLASSES)
            np.testing.assert_allclose(answer["probs"], expected, rtol=0, atol=1e-6)
        assert answer["received"] == 3 and answer["dropped"] == 0


def test_live_drops_stale_frames_and_answers_the_newest(trained):
    _, client, _ = trained
    with client.websocket_connect(f"{WS}/api/live") as live:
        for index in range(6):
            live.send_bytes(jpeg(index % 2, index, size=96))
        answers = [live.receive_json()]
        while answers[-1]["received"] < 6 or answers[-1]["received"] - answers[-1]["dropped"] > len(answers):
            answers.append(live.receive_json())
        assert len(answers) + answers[-1]["dropped"] == 6  # each frame either answered or dropped as stale
        assert answers[-1]["frame"] == 6 and [a["frame"] for a in answers] == sorted({a["frame"] for a in answers})


@pytest.mark.e2e  # the ONNX export alone takes about 10 s
def test_export_downloads_a_graph_that_runs_under_onnx(trained, tmp_path):
    pytest.importorskip("onnx", reason="the deploy extra (requirements-deploy.txt) is not installed")
    pytest.importorskip("onnxruntime", reason="the deploy extra (requirements-deploy.txt) is not installed")
    from pipeline import commands
    from pipeline.common.config import LiveConfig

    _, client, _ = trained
    made = client.post("/api/export")
    assert made.status_code == 201, made.text
    for name in ("classifier.onnx", "classifier.json"):
        (tmp_path / name).write_bytes(client.get(f"/api/export/{name}").content)
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "a.jpg").write_bytes(jpeg(0, 7, size=96))
    predictions = tmp_path / "predictions.jsonl"
    assert commands.live(LiveConfig(onnx=tmp_path / "classifier.onnx", source=str(frames), display=False,
                                    predictions=predictions)) == 0
    assert predictions.read_text().count("\n") == 1
    assert client.get("/api/export/../../x").status_code == 404


def test_dataset_zip_holds_every_image(trained):
    folder, client, _ = trained
    response = client.get("/api/dataset.zip")
    assert response.status_code == 200
    names = sorted(zipfile.ZipFile(io.BytesIO(response.content)).namelist())
    on_disk = sorted(f"images/{p.parent.name}/{p.name}" for p in (folder / "images").glob("*/*.jpg"))
    assert names == on_disk
    assert not list(folder.glob(".dataset-*"))


def test_nothing_trained_is_one_line(tmp_path):
    client = loop_client(tmp_path / "empty")
    assert "press Train" in client.get("/api/evaluate").json()["error"]
    assert client.post("/api/export").status_code == 404
    assert client.post("/api/train", json={"head": "nope"}).status_code == 400
    assert client.post("/api/train/cancel").json()["cancelling"] is False


def test_cancel_stops_at_the_next_epoch_and_keeps_the_finished_head(trained):
    folder, client, _ = trained
    best = folder / "heads" / "linear" / "best.pt"
    before = best.read_bytes()
    assert client.post("/api/train", json={"epochs": 1000}).json()["started"]
    deadline = time.monotonic() + 60
    while not client.get("/api/train").json()["epochs"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.post("/api/train/cancel").json()["cancelling"]
    state = finish(client)
    assert state["state"] == "cancelled" and len(state["epochs"]) < 1000
    assert best.read_bytes() == before and not list(best.parent.glob(".staging*"))


def test_a_deleted_sample_leaves_the_matrix_after_retraining(trained):
    folder, client, _ = trained
    cells = client.get("/api/evaluate").json()["cells"]
    victim = next(item for items in cells.values() for item in items)
    assert client.delete(f"/api/classes/{victim['class']}/samples/{victim['name']}").status_code == 200
    assert client.post("/api/train", json={}).json()["started"]
    assert finish(client)["state"] == "done"
    after = client.get("/api/evaluate").json()
    shown = [item["name"] for items in after["cells"].values() for item in items]
    assert victim["name"] not in shown and after["images"] == sum(len(v) for v in cells.values()) - 1


def test_a_logreg_head_is_evaluated_and_run_live_too(trained):
    folder, client, _ = trained
    assert client.post("/api/train", json={"head": "logreg"}).json()["started"]
    assert finish(client)["state"] == "done"
    assert (folder / "heads" / "logreg" / "best.pt").is_file()
    assert client.get("/api/evaluate").json()["head"] == "logreg"  # the newest head
    with client.websocket_connect(f"{WS}/api/live") as live:
        live.send_bytes(jpeg(0, 3, size=96))
        assert len(live.receive_json()["probs"]) == 2
