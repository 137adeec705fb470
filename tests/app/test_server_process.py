"""run_webcam.py --serve as a user runs it, in a child process: the one printed address, a second server on the same
folder, and a kill in the middle of a capture followed by a restart (no partial file, no saved frame lost)."""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import pytest

from tests.app.conftest import NO_EXTRA, images_of, jpeg, whole_jpeg

pytest.importorskip("uvicorn", reason=NO_EXTRA)
pytest.importorskip("websockets", reason=NO_EXTRA)

from websockets.sync.client import connect  # noqa: E402

pytestmark = pytest.mark.e2e


def get(server, path: str) -> dict:
    request = urllib.request.Request(server.base + path, headers={"X-Token": server.token})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def post(server, path: str, body: dict) -> dict:
    request = urllib.request.Request(server.base + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"X-Token": server.token, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_it_prints_one_address_that_answers_the_page(server, project_dir):
    one = server()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\?token=[0-9a-f]{48}", one.url), one.url
    with urllib.request.urlopen(one.url, timeout=10) as page:
        assert page.status == 200 and b"Hold to record" in page.read()
        assert "HttpOnly" in page.headers["set-cookie"]
    with pytest.raises(urllib.error.HTTPError, match="403"):
        urllib.request.urlopen(one.base + "/api/project", timeout=10)
    second = server()  # the same folder: refused in one line, the first one untouched
    assert second.process.wait(timeout=30) == 2 and second.url == ""
    err = second.stop()
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.strip().splitlines()[-1]]
    assert "is open in another server" in err
    assert get(one, "/api/project")["classes"] == []
    log = one.stop()
    assert "Uvicorn running" not in log and "http://" not in log  # the address is printed once, on stdout


def test_a_kill_mid_capture_loses_no_saved_frame_and_leaves_no_partial_file(server, project_dir):
    first = server()
    post(first, "/api/classes", {"name": "mug"})
    acknowledged, frame = [], jpeg(0, 0, size=480)

    def record():
        try:
            with connect(first.base.replace("http", "ws") + "/api/capture?class=mug", origin=first.base,
                         additional_headers={"X-Token": first.token}, open_timeout=10) as ws:
                ws.recv()
                while True:
                    ws.send(frame)
                    acknowledged.append(json.loads(ws.recv())["saved"])
        except Exception:  # the server was killed under it
            pass

    recorder = threading.Thread(target=record)
    recorder.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 15 and time.monotonic() < deadline:
        time.sleep(0.01)
    first.stop(kill=True)
    recorder.join(timeout=30)
    assert len(acknowledged) >= 15
    folder = project_dir / "images" / "mug"
    visible = images_of(project_dir, "mug")
    visible = [name for name in visible if not name.startswith(".")]
    assert len(visible) >= acknowledged[-1]  # every frame the page was told about is on disk
    assert all(whole_jpeg((folder / name).read_bytes()) for name in visible)  # and nothing partial under a name
    assert all(name.endswith(".partial") for name in images_of(project_dir, "mug") if name.startswith("."))
    restarted = server()  # the kill released the folder's lock: the restart serves the same project
    assert get(restarted, "/api/project")["classes"] == [{"name": "mug", "images": len(visible), "bursts": 1, "val": 0}]
    assert get(restarted, "/api/classes/mug/samples")["samples"] == visible
