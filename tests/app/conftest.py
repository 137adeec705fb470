"""The app's fixtures: its packages are the optional requirements-app.txt, so these tests skip without them."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.data.synthetic import class_image

NO_EXTRA = "the app extra is not installed (pip install -r requirements-app.txt)"

TOKEN = "0123456789abcdef" * 3
PORT = 8765
BASE = f"http://127.0.0.1:{PORT}"


def jpeg(label: int = 0, index: int = 0, size: int = 64) -> bytes:
    return cv2.imencode(".jpg", class_image(label, index, size))[1].tobytes()


def png(label: int = 0, index: int = 0, size: int = 32) -> bytes:
    return cv2.imencode(".png", class_image(label, index, size))[1].tobytes()


def client_for(folder, *, token: bool = True):
    """A test client on the app over ``folder`` (a new Project: as after a restart), holding the token cookie."""
    from starlette.testclient import TestClient

    from pipeline.app.project import Project
    from pipeline.app.routes import Settings, build_app

    client = TestClient(build_app(Project(folder).open(), TOKEN, Settings(port=PORT)), base_url=BASE)
    if token:
        assert client.get(f"/?token={TOKEN}").status_code == 200
    return client


@pytest.fixture
def project_dir(tmp_path):
    return tmp_path / "project"


@pytest.fixture
def client(project_dir):
    return client_for(project_dir)


@pytest.fixture
def two_classes(client):
    for name in ("mug", "pen"):
        assert client.post("/api/classes", json={"name": name}).status_code == 201
    return client


def images_of(project_dir, name: str) -> list[str]:
    return sorted(p.name for p in (project_dir / "images" / name).iterdir())


def whole_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff" and data.rstrip(b"\x00")[-2:] == b"\xff\xd9" and \
        cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None


class Server:
    """``run_webcam.py --serve`` in a child process on a free port; ``url`` is the address it printed."""

    def __init__(self, project, *extra: str):
        import subprocess
        import sys

        from tests.helpers import ROOT

        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "run_webcam.py"), "--serve", "--project", str(project), "--port", "0",
             "--weights", "random", *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.url = self.process.stdout.readline().strip()  # the one address (or "" when it stopped)
        self.base = self.url.split("/?")[0]
        self.token = self.url.rsplit("token=", 1)[-1]

    def stop(self, kill: bool = False) -> str:
        """Stop it (SIGKILL with ``kill``, else SIGTERM); returns what it wrote to stderr."""
        if self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
        _, err = self.process.communicate(timeout=30)
        return err


@pytest.fixture
def server(project_dir):
    started = []

    def start(*extra: str, project=None) -> Server:
        started.append(Server(project or project_dir, *extra))
        return started[-1]

    yield start
    for one in started:
        one.stop()
