"""The page in a real browser: Playwright drives Debian's chromium with a fake camera (a .y4m made here from
generated images; one browser per class, as the fake camera loops one file). Two classes are added and recorded,
a sample is deleted and restored, and the counts and thumbnails are checked against the folder. A screenshot of
each step goes to $APP_SCREENSHOTS (default: the test's tmp folder)."""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.data.synthetic import class_image
from tests.app.conftest import NO_EXTRA, images_of

pytest.importorskip("uvicorn", reason=NO_EXTRA)
sync_api = pytest.importorskip("playwright.sync_api", reason=NO_EXTRA)

pytestmark = pytest.mark.e2e
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("no chromium to drive (apt-get install chromium; .ci/run does)", allow_module_level=True)
WIDTH, HEIGHT = 320, 240


def write_y4m(path: Path, label: int, frames: int = 10) -> Path:
    """A YUV4MPEG2 file of ``frames`` generated pictures of class ``label`` (what the fake camera loops)."""
    with open(path, "wb") as out:
        out.write(f"YUV4MPEG2 W{WIDTH} H{HEIGHT} F10:1 Ip A1:1 C420jpeg\n".encode())
        for index in range(frames):
            bgr = cv2.resize(class_image(label, index, size=96), (WIDTH, HEIGHT), interpolation=cv2.INTER_NEAREST)
            out.write(b"FRAME\n" + cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420).tobytes())
    return path


class Shots:
    def __init__(self, folder: Path):
        self.folder, self.taken = folder, []
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, page, name: str) -> None:
        page.wait_for_function("""() => [...document.images].filter(img => img.offsetParent !== null)
                                  .every(img => img.complete && img.naturalWidth > 0)""", timeout=20_000)
        path = self.folder / f"{len(self.taken) + 1:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        self.taken.append(path)


def count_of(page, name: str) -> int:
    return int(page.locator(f'.card[data-name="{name}"] .count').inner_text().split()[0])


def record(page, name: str, frames: int) -> None:
    """Hold the class's record button until at least ``frames`` are saved, then let go and wait for the burst."""
    before = count_of(page, name)
    button = page.locator(f'.card[data-name="{name}"] .record')
    sync_api.expect(button).to_be_enabled(timeout=20_000)
    button.hover()
    page.mouse.down()
    page.wait_for_function(f"""() => parseInt(document.querySelector('.card[data-name="{name}"] .count')
                                    .textContent) >= {before + frames}""", timeout=30_000)
    page.mouse.up()
    sync_api.expect(page.locator("#message")).to_contain_text(f"into {name}", timeout=20_000)


def open_page(playwright, url: str, camera: Path, camera_needed: bool = True):
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={camera}", "--no-sandbox"])
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url)
    if camera_needed:
        page.wait_for_function("() => document.querySelector('#camera').videoWidth > 0", timeout=20_000)
    return browser, page


def test_two_classes_recorded_deleted_and_restored_in_a_real_browser(server, project_dir, tmp_path):
    shots = Shots(Path(os.environ.get("APP_SCREENSHOTS") or tmp_path / "shots"))
    app = server()
    cameras = [write_y4m(tmp_path / f"class{label}.y4m", label) for label in (0, 1)]
    with sync_api.sync_playwright() as playwright:
        browser, page = open_page(playwright, app.url, cameras[0])
        shots(page, "empty-project")
        for name in ("mug", "pen"):
            page.fill("#new-class", name)
            page.click("#add-form button")
            sync_api.expect(page.locator(f'.card[data-name="{name}"]')).to_be_visible()
        shots(page, "two-classes")
        for burst in range(2):  # two bursts: one falls in train, the other in val
            record(page, "mug", 4)
        shots(page, "mug-recorded")
        browser.close()

        browser, page = open_page(playwright, app.url, cameras[1])  # the second fake camera: the other class
        for burst in range(2):
            record(page, "pen", 4)
        shots(page, "pen-recorded")
        for name in ("mug", "pen"):
            on_disk = images_of(project_dir, name)
            assert count_of(page, name) == len(on_disk) >= 8
            thumbs = page.locator(f'.card[data-name="{name}"] .thumb')
            sync_api.expect(thumbs).to_have_count(len(on_disk))  # the count and the thumbnails come in two requests
            assert sorted(thumbs.evaluate_all("boxes => boxes.map(b => b.dataset.file)")) == on_disk
            page.wait_for_function(f"""() => [...document.querySelectorAll('.card[data-name="{name}"] .thumb img')]
                                       .every(img => img.complete && img.naturalWidth > 0)""")
        assert "0 held out" not in page.locator('.card[data-name="mug"] .detail').inner_text()

        mug = images_of(project_dir, "mug")
        victim = mug[0]
        page.locator(f'.card[data-name="mug"] .thumb[data-file="{victim}"] button').click()
        sync_api.expect(page.locator("#trash-count")).to_have_text("1")
        assert count_of(page, "mug") == len(mug) - 1 and victim not in images_of(project_dir, "mug")
        page.click("#trash-panel summary")
        shots(page, "sample-deleted")
        page.locator(f'#trash-grid .thumb[data-file="{victim}"] button').click()
        sync_api.expect(page.locator("#trash-count")).to_have_text("0")
        sync_api.expect(page.locator(f'.card[data-name="mug"] .thumb[data-file="{victim}"]')).to_be_visible()
        assert count_of(page, "mug") == len(mug) and images_of(project_dir, "mug") == mug
        shots(page, "sample-restored")
        browser.close()
    assert_frames_show_their_class(project_dir)


def assert_frames_show_their_class(project_dir: Path) -> None:
    """Each class's frames came from its own fake camera: their mean colour is nearer its own pictures'."""
    means = {label: class_image(label, 0, size=96).reshape(-1, 3).mean(0) for label in (0, 1)}
    for label, name in enumerate(("mug", "pen")):
        for file in images_of(project_dir, name):
            frame = cv2.imread(str(project_dir / "images" / name / file))
            assert frame is not None and frame.shape[:2] == (HEIGHT, WIDTH)
            mean = frame.reshape(-1, 3).mean(0)
            distances = [np.abs(mean - means[other]).sum() for other in (0, 1)]
            assert int(np.argmin(distances)) == label, (name, file, distances)


def outward_address() -> str | None:
    """This computer's address on its network (not the loopback), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the interface
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_off_the_loopback_the_page_says_capture_needs_the_loopback_or_https(server, tmp_path):
    address = outward_address()
    if address is None:
        pytest.skip("this computer has no address besides the loopback")
    shots = Shots(Path(os.environ.get("APP_SCREENSHOTS") or tmp_path / "shots") / "off-loopback")
    app = server("--host", "0.0.0.0", project=tmp_path / "other")
    assert "reachable from the network" in app.process.stderr.readline() + app.process.stderr.readline()
    port = app.base.rsplit(":", 1)[1]
    with sync_api.sync_playwright() as playwright:
        browser, page = open_page(playwright, f"http://{address}:{port}/?token={app.token}", write_y4m(tmp_path / "c.y4m", 0),
                                  camera_needed=False)
        page.fill("#new-class", "mug")
        page.click("#add-form button")
        sync_api.expect(page.locator("#camera-note")).to_contain_text("needs the page on the loopback")
        sync_api.expect(page.locator('.card[data-name="mug"] .record')).to_be_disabled()
        shots(page, "capture-needs-loopback")
        browser.close()
