"""Classes and samples through the API: add, rename, remove, thumbnails, delete to the trash and restore, uploads
(by content, within limits, hostile zips refused whole), webcam capture in bursts; all of it read back from disk."""
from __future__ import annotations

import io
import os
import zipfile

import pytest

from tests.app.conftest import NO_EXTRA, PORT, client_for, images_of, jpeg, png, whole_jpeg

pytest.importorskip("starlette", reason=NO_EXTRA)
pytest.importorskip("httpx2", reason=NO_EXTRA)

from pipeline.app import files  # noqa: E402
from pipeline.datasets.holdout import burst_of  # noqa: E402

CAPTURE = f"ws://127.0.0.1:{PORT}/api/capture"


def classes(client) -> dict[str, int]:
    return {c["name"]: c["images"] for c in client.get("/api/project").json()["classes"]}


def capture(client, name: str, frames: list[bytes]) -> list[dict]:
    with client.websocket_connect(f"{CAPTURE}?class={name}") as ws:
        replies = [ws.receive_json()]
        for frame in frames:
            ws.send_bytes(frame)
            replies.append(ws.receive_json())
        ws.send_text("end")
        replies.append(ws.receive_json())
    return replies


def zipped(entries: dict[str, bytes], symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def test_add_rename_remove_a_class_and_restart(two_classes, project_dir):
    client = two_classes
    assert classes(client) == {"mug": 0, "pen": 0}
    assert client.post("/api/classes", json={"name": "mug"}).status_code == 409
    assert client.post("/api/classes/pen/rename", json={"to": "mug"}).status_code == 409
    assert client.post("/api/classes/pen/rename", json={"to": "pencil"}).status_code == 200
    assert client.post("/api/classes/nope/rename", json={"to": "x"}).status_code == 404
    capture(client, "mug", [jpeg(0, i) for i in range(2)])
    removed = client.delete("/api/classes/mug").json()
    assert removed == {"removed": "mug", "to_trash": 2} and classes(client) == {"pencil": 0}
    trash = client.get("/api/trash").json()["items"]
    assert [item["class"] for item in trash] == ["mug", "mug"]
    restarted = client_for(project_dir)  # a new process on the same folder: the same project
    assert classes(restarted) == {"pencil": 0} and restarted.get("/api/trash").json()["items"] == trash
    for item in trash:  # restoring brings the removed class back, with its frames' own names
        assert restarted.post("/api/trash/restore", json=item).json()["restored"] == item["name"]
    assert classes(restarted) == {"mug": 2, "pencil": 0}
    assert images_of(project_dir, "mug") == sorted(item["name"] for item in trash)


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "train", "mug.jpg", " mug", "", "x" * 300,
                                  "tab\there"])
def test_a_bad_class_name_is_one_line_and_writes_nothing(client, project_dir, name):
    response = client.post("/api/classes", json={"name": name})
    assert response.status_code == 400 and response.json()["error"].startswith(("class ", "--collect needs"))
    assert "\n" not in response.json()["error"]
    assert not list((project_dir / "images").iterdir()) and not (project_dir / "evil").exists()


def test_names_from_the_page_never_reach_outside_the_project(two_classes, project_dir):
    (project_dir / "secret.jpg").write_bytes(jpeg())
    client = two_classes
    for path in ("/api/classes/mug/samples/..%2F..%2Fsecret.jpg", "/api/classes/mug/samples/.lock",
                 "/api/classes/..%2Fimages/samples", "/api/trash/..%2F/secret.jpg", "/api/classes/mug/samples/x.txt",
                 "/api/classes/%2E%2E/samples/secret.jpg"):
        assert client.get(path).status_code in (400, 404), path
        assert client.delete(path).status_code in (400, 404, 405), path
    bad = client.post("/api/trash/restore", json={"class": "..", "name": "secret.jpg"})
    assert bad.status_code == 400
    assert client.post("/api/trash/restore", json={"class": "mug"}).status_code == 400
    assert client.post("/api/classes/mug/rename", content=b"not json").status_code == 400
    assert (project_dir / "secret.jpg").is_file()


def test_thumbnails_delete_to_the_trash_and_restore(two_classes, project_dir):
    client = two_classes
    capture(client, "mug", [jpeg(0, i, size=400) for i in range(3)])
    names = client.get("/api/classes/mug/samples").json()["samples"]
    assert names == images_of(project_dir, "mug") and len(names) == 3
    thumb = client.get(f"/api/classes/mug/samples/{names[0]}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg" and whole_jpeg(thumb.content)
    full = client.get(f"/api/classes/mug/samples/{names[0]}?full=1").content
    assert full == (project_dir / "images" / "mug" / names[0]).read_bytes() and len(thumb.content) < len(full)
    assert client.delete(f"/api/classes/mug/samples/{names[0]}").json() == {"trashed": names[0]}
    assert classes(client)["mug"] == 2 and (project_dir / "trash" / "mug" / names[0]).is_file()
    assert client.get(f"/api/trash/mug/{names[0]}").status_code == 200
    assert client.delete(f"/api/classes/mug/samples/{names[0]}").status_code == 404
    assert client.post("/api/trash/restore", json={"class": "mug", "name": names[0]}).status_code == 200
    assert images_of(project_dir, "mug") == names and client.get("/api/trash").json()["items"] == []


def test_capture_writes_bursts_as_collect_does(two_classes, project_dir):
    client = two_classes
    first = capture(client, "mug", [jpeg(0, i) for i in range(4)])
    assert [r.get("saved") for r in first[1:5]] == [1, 2, 3, 4] and first[-1]["done"] == 4
    second = capture(client, "mug", [jpeg(0, i) for i in range(2)])
    files_now = images_of(project_dir, "mug")
    assert {burst_of(n) for n in files_now} == {first[0]["burst"], second[0]["burst"]}
    assert all(whole_jpeg((project_dir / "images" / "mug" / n).read_bytes()) for n in files_now)
    info = client.get("/api/project").json()["classes"][0]
    assert (info["images"], info["bursts"]) == (6, 2) and 0 < info["val"] < 6  # one burst each side of the split


def test_capture_refuses_what_is_not_a_frame_and_keeps_the_saved_ones(two_classes, project_dir):
    from starlette.websockets import WebSocketDisconnect

    with two_classes.websocket_connect(f"{CAPTURE}?class=mug") as ws:
        ws.receive_json()
        ws.send_bytes(jpeg())
        assert ws.receive_json() == {"saved": 1}
        ws.send_bytes(png())
        assert "not a JPEG" in ws.receive_json()["error"]
    for name in ("nope", "../x"):
        with pytest.raises(WebSocketDisconnect):
            with two_classes.websocket_connect(f"{CAPTURE}?class={name}"):
                pass
    assert len(images_of(project_dir, "mug")) == 1


def test_uploads_are_recognised_by_content(two_classes, project_dir):
    client = two_classes
    stored = client.post("/api/classes/pen/upload?filename=../../photo.txt", content=png()).json()
    assert stored == {"stored": ["photo.png"], "skipped": []}
    again = client.post("/api/classes/pen/upload?filename=photo.png", content=png(1)).json()
    assert again["stored"] == ["photo-1.png"]  # never over a file
    for data, what in ((b"hello, not an image", "not an image"), (jpeg()[:200], "damaged"),
                       (b"GIF89a" + b"\0" * 20, "damaged")):
        response = client.post("/api/classes/pen/upload?filename=x.jpg", content=data)
        assert response.status_code == 415 and what in response.json()["error"]
    assert client.post("/api/classes/nope/upload?filename=a.png", content=png()).status_code == 404
    assert images_of(project_dir, "pen") == ["photo-1.png", "photo.png"]


def test_an_oversized_upload_is_refused(two_classes, project_dir, monkeypatch):
    from pipeline.app import routes

    monkeypatch.setattr(routes, "MAX_UPLOAD_BYTES", 1000)
    response = two_classes.post("/api/classes/pen/upload?filename=big.jpg", content=jpeg(size=200))
    assert response.status_code == 413 and "allowed" in response.json()["error"]
    chunks = (b"\0" * 600 for _ in range(3))  # no Content-Length: counted as it streams
    assert two_classes.post("/api/classes/pen/upload?filename=big.jpg", content=chunks).status_code == 413
    assert images_of(project_dir, "pen") == []


def test_a_zip_uploads_its_images_and_names_what_it_skipped(two_classes, project_dir):
    data = zipped({"a/one.jpg": jpeg(1, 0), "two.png": png(1, 1), "notes.txt": b"hi", "__MACOSX/._one.jpg": b"x",
                   "inner.zip": zipped({"x.jpg": jpeg()})})
    result = two_classes.post("/api/classes/pen/upload?filename=photos.zip", content=data).json()
    assert sorted(result["stored"]) == ["one.jpg", "two.png"]
    assert len(result["skipped"]) == 3 and any("notes.txt (not an image" in s for s in result["skipped"])
    assert images_of(project_dir, "pen") == ["one.jpg", "two.png"]


@pytest.mark.parametrize("entries,symlink,what", [
    ({"ok.jpg": b"", "../../escape.jpg": b""}, None, "escapes its folder"),
    ({"/abs/evil.jpg": b""}, None, "escapes its folder"),
    ({"ok.jpg": b""}, "link.jpg", "symbolic link"),
])
def test_a_hostile_zip_is_refused_whole(two_classes, project_dir, entries, symlink, what):
    entries = {name: data or jpeg() for name, data in entries.items()}
    response = two_classes.post("/api/classes/pen/upload?filename=x.zip", content=zipped(entries, symlink))
    assert response.status_code == 400 and what in response.json()["error"]
    assert images_of(project_dir, "pen") == [] and not (project_dir.parent / "escape.jpg").exists()


def test_a_zip_that_unpacks_past_the_limit_is_refused(two_classes, project_dir, monkeypatch):
    monkeypatch.setattr(files, "MAX_UNPACKED_BYTES", 100_000)
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.jpg", jpeg())
        archive.writestr("zeros.jpg", b"\xff\xd8\xff" + b"\0" * 200_000)  # 200 kB of zeros: deflates to a few hundred bytes
    response = two_classes.post("/api/classes/pen/upload?filename=bomb.zip", content=bomb.getvalue())
    assert response.status_code == 413 and "unpacks to" in response.json()["error"]
    assert images_of(project_dir, "pen") == []
    monkeypatch.setattr(files, "MAX_ZIP_MEMBERS", 1)
    response = two_classes.post("/api/classes/pen/upload?filename=m.zip", content=zipped({"a.jpg": jpeg(), "b.jpg": jpeg()}))
    assert response.status_code == 413 and "entries" in response.json()["error"]


def test_a_full_disk_is_one_line_and_leaves_no_file(two_classes, project_dir, monkeypatch):
    real_fsync = os.fsync

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    response = two_classes.post("/api/classes/pen/upload?filename=a.png", content=png())
    assert response.status_code == 507 and "the disk is full" in response.json()["error"]
    with two_classes.websocket_connect(f"{CAPTURE}?class=mug") as ws:
        ws.receive_json()
        ws.send_bytes(jpeg())
        assert "No space left" in ws.receive_json()["error"]
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert os.listdir(project_dir / "images" / "pen") == [] and os.listdir(project_dir / "images" / "mug") == []
