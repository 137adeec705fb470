"""Who may drive the app: the token, the Host and Origin checks on HTTP and WebSocket, one server per folder, the
port; and the --serve flags."""
from __future__ import annotations

import socket

import pytest

from tests.app.conftest import BASE, NO_EXTRA, PORT, TOKEN, client_for

pytest.importorskip("starlette", reason=NO_EXTRA)
pytest.importorskip("httpx2", reason=NO_EXTRA)

from starlette.websockets import WebSocketDisconnect  # noqa: E402

import run_webcam  # noqa: E402
from features.locking import hold_lock  # noqa: E402
from pipeline.app.server import serve  # noqa: E402
from pipeline.common.config import ServeConfig, webcam_config  # noqa: E402
from pipeline.common.errors import UserError  # noqa: E402

ROUTES = [("GET", "/"), ("GET", "/api/project"), ("POST", "/api/classes"), ("POST", "/api/classes/mug/rename"),
          ("DELETE", "/api/classes/mug"), ("GET", "/api/classes/mug/samples"), ("GET", "/api/classes/mug/samples/a.jpg"),
          ("DELETE", "/api/classes/mug/samples/a.jpg"), ("POST", "/api/classes/mug/upload"), ("GET", "/api/trash"),
          ("POST", "/api/trash/restore"), ("GET", "/api/trash/mug/a.jpg"), ("GET", "/static/app.js")]


def test_the_printed_address_answers_the_page_and_sets_the_token_cookie(project_dir):
    client = client_for(project_dir, token=False)
    assert client.get("/").status_code == 403
    assert client.get("/?token=wrong").status_code == 403
    page = client.get(f"/?token={TOKEN}")
    assert page.status_code == 200 and "Hold to record" in page.text
    cookie = page.headers["set-cookie"]
    assert f"={TOKEN}" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert client.get("/api/project").status_code == 200  # the cookie from now on
    assert client.get("/static/app.js").status_code == 200


@pytest.mark.parametrize("method,path", ROUTES)
def test_every_route_without_the_token_is_403(project_dir, method, path):
    client = client_for(project_dir, token=False)
    response = client.request(method, path)
    assert response.status_code == 403 and "token" in response.text
    assert client.request(method, path, headers={"X-Token": "not-it"}).status_code == 403


def test_the_token_as_a_header_is_enough(project_dir):
    client = client_for(project_dir, token=False)
    assert client.get("/api/project", headers={"X-Token": TOKEN}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example:8765", "127.0.0.1:9999", "localhost.evil.example", ""])
def test_a_foreign_host_is_refused_even_with_the_token(client, host):
    """DNS rebinding: a page at evil.example whose name now points at 127.0.0.1 sends Host: evil.example."""
    response = client.get("/api/project", headers={"Host": host})
    assert response.status_code == 403 and "Host" in response.text
    assert client.get("/api/project", headers={"Host": f"localhost:{PORT}"}).status_code == 200


@pytest.mark.parametrize("origin", ["http://evil.example", f"http://localhost:{PORT}0", "null"])
def test_a_foreign_origin_is_refused_even_with_the_token(client, project_dir, origin):
    response = client.post("/api/classes", json={"name": "mug"}, headers={"Origin": origin})
    assert response.status_code == 403 and "refused" in response.text
    assert not (project_dir / "images" / "mug").exists()
    assert client.post("/api/classes", json={"name": "mug"}, headers={"Origin": BASE}).status_code == 201


def test_a_websocket_needs_the_token_and_this_origin(two_classes, project_dir):
    url = f"ws://127.0.0.1:{PORT}/api/capture?class=mug"
    anonymous = client_for(project_dir, token=False)
    for client, headers in ((anonymous, {}), (two_classes, {"Origin": "http://evil.example"}),
                            (two_classes, {"Host": "evil.example:8765"})):
        with pytest.raises(WebSocketDisconnect):
            with client.websocket_connect(url, headers=headers):
                pass
    assert not list((project_dir / "images" / "mug").iterdir())
    with two_classes.websocket_connect(url, headers={"Origin": BASE}) as ws:
        assert ws.receive_json()["saved"] == 0


def test_a_second_server_on_the_same_folder_is_one_line(project_dir):
    with hold_lock(project_dir, "pid 1 (run_webcam.py --serve)", RuntimeError):
        with pytest.raises(UserError, match=r"is open in another server \(pid 1 .*one server per project folder"):
            serve(ServeConfig(project=project_dir, port=0))


def test_a_busy_port_is_one_line(project_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} is busy.*--port"):
            serve(ServeConfig(project=project_dir, port=port))


def test_the_serve_flags(tmp_path):
    parse = lambda *argv: webcam_config(vars(run_webcam.build_parser().parse_args(list(argv))))
    config = parse("--serve", "--weights", "random", "--seed", "3", "--backbone", "resnet18")
    assert (config.project.as_posix(), config.port, config.host, config.weights, config.seed, config.backbone) == \
        ("runs/app", 8765, "127.0.0.1", "random", 3, "resnet18")
    with pytest.raises(UserError, match="--serve runs the page.*drop --checkpoint"):
        parse("--serve", "--checkpoint", "x.pt")
    with pytest.raises(UserError, match="--backbone only apply to --collect CLASS or --serve"):
        parse("--backbone", "alexnet")
    with pytest.raises(UserError, match="--port must be from 0"):
        parse("--serve", "--port", "70000").check()
    with pytest.raises(UserError, match="unknown backbone family 'nope:'"):
        serve(parse("--serve", "--backbone", "nope:net", "--project", str(tmp_path / "p")))
    assert not (tmp_path / "p").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file"):
        parse("--serve", "--project", str(tmp_path / "file")).check()
