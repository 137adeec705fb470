"""The loop in a real browser (#35): two classes recorded from two fake cameras, trained with the progress bar and
curves, the confusion matrix and a cell's images, live bars that are the classifier's probabilities for the frames
the page sent (the ONNX runtime: fp32, so equal; torch: at the precision auto chose), and the export downloaded and
run under ``run_webcam.py --onnx``. A screenshot of each step goes to $APP_SCREENSHOTS (default: tmp)."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.app.conftest import NO_EXTRA
from tests.app.test_browser import Shots, open_page, record, write_y4m

pytest.importorskip("uvicorn", reason=NO_EXTRA)
sync_api = pytest.importorskip("playwright.sync_api", reason=NO_EXTRA)
pytest.importorskip("onnxruntime", reason="the deploy extra (requirements-deploy.txt) is not installed")

pytestmark = pytest.mark.e2e


def live_pairs(page, runtime: str, answers: int = 4) -> list[tuple[bytes, dict]]:
    """Start live on ``runtime``; (the JPEG the page sent, the server's answer for it) for ``answers`` answers."""
    answered = []
    page.evaluate("""() => {  // keep what the page sends on the live socket (Playwright's framesent omits Blobs)
        window.sentFrames = [];
        if (window.sendKept) return;
        window.sendKept = true;
        const send = WebSocket.prototype.send;
        WebSocket.prototype.send = function (data) {
            if (this.url.includes("/api/live") && data instanceof Blob) window.sentFrames.push(data);
            return send.call(this, data);
        };
    }""")
    page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: answered.append(json.loads(payload)))
            if "/api/live" in ws.url else None)
    page.select_option("#live-runtime", runtime)
    page.click("#live-toggle")
    page.wait_for_function("() => document.querySelectorAll('#bars .bar').length === 2", timeout=60_000)
    page.wait_for_timeout(100)
    deadline = 200
    while len(answered) < answers and deadline:
        page.wait_for_timeout(100)
        deadline -= 1
    page.click("#live-toggle")
    page.wait_for_timeout(300)
    wanted = [answer["frame"] - 1 for answer in answered[:answers] if "probs" in answer]
    encoded = page.evaluate("""async (wanted) => Promise.all(wanted.map(async (i) => {
        const bytes = new Uint8Array(await window.sentFrames[i].arrayBuffer());
        let text = ""; for (const b of bytes) text += String.fromCharCode(b); return btoa(text); }))""", wanted)
    binary = dict(zip(wanted, (base64.b64decode(text) for text in encoded)))
    return [(binary[answer["frame"] - 1], answer) for answer in answered[:answers] if "probs" in answer]


def rgb_of(jpeg: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_record_train_look_live_and_export_in_a_real_browser(server, project_dir, tmp_path):
    from pipeline.common.config import LiveConfig
    from pipeline.live.start import open_classifier

    shots = Shots(Path(os.environ.get("APP_SCREENSHOTS") or tmp_path / "shots") / "loop")
    app = server()
    cameras = [write_y4m(tmp_path / f"class{label}.y4m", label) for label in (0, 1)]
    with sync_api.sync_playwright() as playwright:
        browser, page = open_page(playwright, app.url, cameras[0])
        for name in ("mug", "pen"):
            page.fill("#new-class", name)
            page.click("#add-form button")
            sync_api.expect(page.locator(f'.card[data-name="{name}"]')).to_be_visible()
        for _ in range(2):
            record(page, "mug", 4)
        browser.close()
        browser, page = open_page(playwright, app.url, cameras[1])  # the second fake camera: the other class
        for _ in range(2):
            record(page, "pen", 4)
        shots(page, "recorded")

        page.click("#train")
        page.wait_for_function("() => document.querySelector('#train-progress').value > 0.5", timeout=180_000)
        shots(page, "training")
        sync_api.expect(page.locator("#train-line")).to_contain_text("Done", timeout=180_000)
        sync_api.expect(page.locator("#matrix td.cell")).to_have_count(4, timeout=30_000)
        page.locator("#matrix td.cell").first.click()
        shots(page, "trained-confusion-matrix")
        matrix = page.locator("#matrix td.cell").evaluate_all("cells => cells.map(c => +c.textContent)")
        assert sum(matrix) > 0

        checkpoint = project_dir / "heads" / "linear" / "best.pt"
        pairs = live_pairs(page, "torch")
        shots(page, "live-bars")
        torch_classifier = open_classifier(LiveConfig(checkpoint=checkpoint))
        assert pairs
        for jpeg, answer in pairs:  # auto precision may differ between two processes: close, not equal
            np.testing.assert_allclose(answer["probs"], torch_classifier.predict([rgb_of(jpeg)])[0], atol=0.05)
        assert float(page.locator("#live-line").get_attribute("data-fps")) > 0

        page.click("#export")
        sync_api.expect(page.locator("#export-links a")).to_have_count(2, timeout=180_000)
        shots(page, "exported")
        downloads = tmp_path / "downloads"
        for name in ("classifier.onnx", "classifier.json"):
            with page.expect_download() as info:
                page.click(f'#export-links a:has-text("{name}")')
            info.value.save_as(downloads / name)
        onnx_pairs = live_pairs(page, "onnx")
        onnx = open_classifier(LiveConfig(onnx=downloads / "classifier.onnx"))
        assert onnx_pairs
        for jpeg, answer in onnx_pairs:  # the exported graph computes in fp32 on both sides: equal
            np.testing.assert_allclose(answer["probs"], onnx.predict([rgb_of(jpeg)])[0], rtol=0, atol=1e-5)
        shots(page, "live-bars-onnx")
        browser.close()
    frames = tmp_path / "frames"
    frames.mkdir()
    for index, (jpeg, _) in enumerate(onnx_pairs):
        (frames / f"{index}.jpg").write_bytes(jpeg)
    predictions = tmp_path / "predictions.jsonl"
    from tests.helpers import ROOT

    subprocess.run([sys.executable, str(ROOT / "run_webcam.py"), "--onnx", str(downloads / "classifier.onnx"),
                    "--source", str(frames), "--no-display", "--predictions", str(predictions)], check=True,
                   cwd=ROOT, timeout=120)
    assert len(predictions.read_text().splitlines()) == len(onnx_pairs)
