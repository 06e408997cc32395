"""The device's own status page (`status_page: true`) in a real daemon with a real frame source,
read by Debian's chromium: models and their batching, the source's rate and last error, the last
frame as an image with its prediction, recent results; off by default."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, Daemon

pytestmark = pytest.mark.e2e


def fetch(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def test_status_page_is_off_by_default(installed_state: Path) -> None:
    d = Daemon(installed_state)
    try:
        code, body, _ = fetch(d.url + "/status")
        assert code == 404 and b"status_page: true" in body
        assert fetch(d.url + "/status.json")[0] == 404
    finally:
        assert d.stop() == 0


def test_status_page_shows_the_fleet_link_and_the_outbox(
    installed_state: Path, fleet_key: Path, tmp_path: Path
) -> None:
    from tests.broker import Broker
    from tests.conftest import wait_for

    broker = Broker(tmp_path / "broker", {"cam-1": "cam-secret"})
    (tmp_path / "pw").write_text("cam-secret")
    cfg = tmp_path / "edgert.yaml"
    cfg.write_text("status_page: true\n")
    d = Daemon(installed_state, "--config", str(cfg), "--broker", broker.url, "--device-id", "cam-1", "--group",
               "door", "--fleet-key", str(fleet_key / "signing.pub"), "--broker-password-file", str(tmp_path / "pw"))  # fmt: skip
    try:

        def fleet() -> dict[str, object] | None:
            s = json.loads(fetch(d.url + "/status.json")[1])
            return s if s["fleet"] and s["fleet"]["connected"] else None

        s = wait_for(fleet, 30, "the agent connected, on the status page")
        assert s["fleet"] == {"connected": True, "device": "cam-1", "group": "door"}
        assert set(s["outbox"]) == {"depth", "bytes", "disk_bytes", "dropped"}
        broker.stop()  # the broker goes away: the page says so, the device keeps serving
        wait_for(lambda: not json.loads(fetch(d.url + "/status.json")[1])["fleet"]["connected"], 30, "disconnected")
    finally:
        assert d.stop() == 0
        broker.stop()


@pytest.mark.browser
def test_status_page_shows_models_sources_and_last_frames(
    installed_state: Path, orientation_data: tuple[Path, Path], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.browser import chromium, screenshot

    cfg = tmp_path / "edgert.yaml"
    cfg.write_text(
        "status_page: true\n"
        "sources:\n"
        f"  - {{name: pages, model: orientation, kind: images, uri: '{orientation_data[1]}', fps: 5, loop: true}}\n"
        f"  - {{name: 'cam<b>0</b>', model: orientation, kind: camera, uri: '/dev/video-missing'}}\n"
    )
    d = Daemon(installed_state, "--config", str(cfg))
    try:
        code, body, ctype = fetch(d.url + "/status.json")
        assert code == 200 and ctype == "application/json"
        s = json.loads(body)
        assert [m["name"] for m in s["models"]] == ["orientation"] and s["models"][0]["version"] == "1.0.0"
        assert s["fleet"] is None and s["outbox"] is None  # offline device: said, not hidden
        with chromium() as b:
            wait = WebDriverWait(b, 60, poll_frequency=0.2)
            b.get(d.url + "/status")

            def cell(table: str, row: int, col: int) -> str:
                rows = b.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")
                return rows[row].find_elements(By.TAG_NAME, "td")[col].text if len(rows) > row else ""

            wait.until(lambda _: cell("models", 0, 0) == "orientation" and cell("models", 0, 1) == "1.0.0")
            # The folder source runs at its configured rate; frames are inferred, the rate is measured.
            wait.until(lambda _: any(r.text.startswith("pages images orientation") for r in
                                     b.find_elements(By.CSS_SELECTOR, "#sources tbody tr")))  # fmt: skip
            wait.until(lambda _: int(b.execute_script("return window.edgertPolls")) >= 4)
            rows = {
                r.find_elements(By.TAG_NAME, "td")[0].text: r
                for r in b.find_elements(By.CSS_SELECTOR, "#sources tbody tr")
            }
            fps = float(rows["pages"].find_elements(By.TAG_NAME, "td")[3].text)
            assert 3.0 <= fps <= 7.0, fps
            # The camera that is not there: its name (HTML) shown as text, and why it gives nothing.
            assert "cam<b>0</b>" in rows
            assert (
                "cannot open camera '/dev/video-missing'"
                in rows["cam<b>0</b>"].find_elements(By.TAG_NAME, "td")[8].text
            )
            assert not b.find_elements(By.CSS_SELECTOR, "#sources b")
            # The last frame, as a real image decoded by the browser, with its prediction under it.
            wait.until(lambda _: b.execute_script(
                "const i = document.querySelector('[data-source=\"pages\"] img'); return i && i.complete && i.naturalWidth > 0"))  # fmt: skip
            width = b.execute_script("return document.querySelector('[data-source=\"pages\"] img').naturalWidth")
            assert 0 < width <= 320
            caption = b.find_element(By.CSS_SELECTOR, '[data-source="pages"] div').text
            label = caption.split(": ", 1)[1].split("/")[0]  # frame id: <true label>/page-....png
            assert "→" in caption and caption.split("→ ")[1].split(" ")[0] == label
            wait.until(lambda _: len(b.find_elements(By.CSS_SELECTOR, "#recent tbody tr")) >= 3)
            assert "no fleet agent" in b.find_element(By.ID, "outbox").text
            shots = Path(os.environ.get("EDGERT_SCREENSHOTS") or tmp_path)
            screenshot(b, (shots if shots.is_absolute() else REPO / shots) / "device-status.png")
        code, jpeg, ctype = fetch(d.url + "/status/frames/pages.jpg")
        assert code == 200 and ctype == "image/jpeg" and jpeg[:3] == b"\xff\xd8\xff"
        assert fetch(d.url + "/status/frames/nope.jpg")[0] == 404
    finally:
        assert d.stop() == 0
