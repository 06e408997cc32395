"""The fleet console in a real browser: Debian's chromium (headless) against a real mosquitto, a
`edgert fleet simulate` fleet (real agents) and a real controller (`edgert fleet console`, and a
separate `edgert fleet rollout` process driving the canary).

The browser test starts a canary, watches the page's numbers change without a reload, aborts from
the page through the confirmation dialog and sees every device back on the old version; it takes
the screenshots under docs/ (set EDGERT_SCREENSHOTS=docs to refresh them). The HTTP tests send
what a browser would not: actions without a session, forged and replayed tickets, cross-site
posts, and a device whose id, group and version are HTML.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.contracts.bundle import generate_keypair
from tests.broker import Broker
from tests.conftest import REPO, edgert, free_port, terminate, wait_for
from tests.fleet_models import make_bundle

pytestmark = pytest.mark.e2e

DEVICE_PW = "web-secret"
DEVICES = 6
ACCOUNTS = {"controller": "ctl-secret"} | {f"web-{i:03d}": DEVICE_PW for i in range(DEVICES)}
TOKEN = "console-token-0123456789abcdef"
EVIL_ID = "<img src=x onerror=window.pwned=1>"
EVIL_VERSION = "<script>window.pwned=2</script>"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("console-broker"), ACCOUNTS)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, keys: Path, broker: Broker) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("console-fleet")
    generate_keypair(d / "fleet")
    (d / "ctl.pw").write_text(ACCOUNTS["controller"])
    (d / "dev.pw").write_text(DEVICE_PW)
    (d / "token").write_text(TOKEN + "\n")
    k = keys / "signing.key"
    return {
        "root": d, "fleet_key": d / "fleet/signing.key", "fleet_pub": d / "fleet/signing.pub",
        "ctl_pw": d / "ctl.pw", "dev_pw": d / "dev.pw", "token": d / "token", "state": d / "fleet.db",
        "v1": make_bundle(d / "cls-1.0.0.edgepkg", k, "1.0.0"),
        "v2": make_bundle(d / "cls-2.0.0.edgepkg", k, "2.0.0"),
    }  # fmt: skip


def fleet_cli(broker: Broker, fleet: dict[str, Path], *args: str) -> list[str]:
    return [sys.executable, "-m", "edge_runtime.cli", "fleet", "--broker", broker.controller_url,
            "--signing-key", str(fleet["fleet_key"]), "--state", str(fleet["state"]), "--broker-user", "controller",
            "--broker-password-file", str(fleet["ctl_pw"]), *args]  # fmt: skip


class Proc:
    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log_path = log
        self.log = open(log, "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        code = terminate(self.proc)
        self.log.close()
        return code


@pytest.fixture(scope="module")
def devices(broker: Broker, fleet: dict[str, Path], keys: Path) -> Iterator[Proc]:
    sim = Proc(
        [sys.executable, "-m", "edge_runtime.cli", "fleet", "simulate", "--broker", broker.url,
         "--devices", str(DEVICES), "--state-root", str(fleet["root"] / "devices"), "--group", "web",
         "--prefix", "web", "--trust", str(keys / "signing.pub"), "--fleet-key", str(fleet["fleet_pub"]),
         "--device-password-file", str(fleet["dev_pw"]), "--bundle", str(fleet["v1"]), "--rate", "20",
         "--telemetry-interval", "0.5"],
        fleet["root"] / "simulate.log",
    )  # fmt: skip
    yield sim
    sim.stop()


@pytest.fixture(scope="module")
def console(broker: Broker, fleet: dict[str, Path], devices: Proc) -> Iterator[str]:
    port = free_port()
    proc = Proc(fleet_cli(broker, fleet, "console", "--port", str(port), "--token-file", str(fleet["token"]),
                          "--sample-period", "1"), fleet["root"] / "console.log")  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.proc.poll() is not None:
            raise AssertionError(f"console exited {proc.proc.returncode}: {proc.output()}")
        try:
            return get(url + "/healthz")[0] == 200
        except OSError:
            return False

    wait_for(up, 30, "the console to listen")
    yield url
    assert proc.stop() == 0, proc.output()
    assert "Traceback" not in proc.output(), proc.output()


def get(url: str, cookie: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Cookie": cookie} if cookie else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def post(url: str, doc: Any, cookie: str | None = None, origin: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if cookie:
        headers["Cookie"] = cookie
    if origin:
        headers["Origin"] = origin
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a: Any, **kw: Any) -> None:
        return None


def login(url: str, token: str = TOKEN) -> str | None:
    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(f"{url}/login?token={token}", timeout=10)
    except urllib.error.HTTPError as e:
        cookie = e.headers.get("Set-Cookie")
        return cookie.split(";")[0] if e.code == 303 and cookie else None
    return None


def serving(broker: Broker, fleet: dict[str, Path]) -> dict[str, str | None]:
    r = subprocess.run(fleet_cli(broker, fleet, "devices", "--group", "web", "--json"), capture_output=True,
                       text=True, check=True)  # fmt: skip
    return {d["id"]: d["models"].get("cls", {}).get("serving") for d in json.loads(r.stdout)["devices"]}


def publish(broker: Broker, fleet: dict[str, Path], keys: Path) -> None:
    for b in ("v1", "v2"):
        subprocess.run(fleet_cli(broker, fleet, "publish", str(fleet[b]), "--trust", str(keys / "signing.pub")),
                       check=True, capture_output=True)  # fmt: skip


# --- the browser: a canary watched live, aborted from the page --------------------------------


@pytest.mark.browser
def test_canary_watched_live_and_aborted_from_the_page(
    broker: Broker, fleet: dict[str, Path], keys: Path, console: str, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.browser import chromium, screenshot

    shots = Path(os.environ.get("EDGERT_SCREENSHOTS") or tmp_path)
    if not shots.is_absolute():
        shots = REPO / shots
    publish(broker, fleet, keys)
    wait_for(lambda: list(serving(broker, fleet).values()) == ["1.0.0"] * DEVICES, 60, "6 devices on 1.0.0")
    with chromium() as b:
        wait = WebDriverWait(b, 60, poll_frequency=0.2)

        def text(css: str) -> str:
            found = b.find_elements(By.CSS_SELECTOR, css)
            return found[0].text if found else ""

        # Read-only on loopback: the fleet page shows every device without a login, and no actions.
        b.get(console + "/")
        wait.until(lambda _: text("#n-devices") == str(DEVICES) and text("#n-online") == str(DEVICES))
        assert "log in to act" in b.page_source
        # Log in through the form (the cookie is HttpOnly: the page's script never sees it).
        b.get(console + "/login")
        b.find_element(By.ID, "token").send_keys(TOKEN)
        b.find_element(By.ID, "login").click()
        wait.until(lambda _: "log out" in b.page_source)
        assert b.execute_script("return document.cookie") == ""

        # A canary driven by its own controller process, with a health window long enough to watch.
        driver = Proc(fleet_cli(broker, fleet, "rollout", "cls:2.0.0", "--group", "web", "--strategy", "canary",
                                "--steps", "50,100", "--health-window", "60", "--min-inferences", "10",
                                "--min-devices", "3"), tmp_path / "rollout.log")  # fmt: skip
        try:
            b.get(console + "/rollouts")
            wait.until(lambda _: b.find_elements(By.LINK_TEXT, "1"))
            b.find_element(By.LINK_TEXT, "1").click()
            wait.until(lambda _: text("#rollout-status") == "running")
            loaded = b.execute_script("return window.edgertLoadedAt")

            def on(version: str) -> int:
                els = b.find_elements(By.CSS_SELECTOR, f'.serving[data-version="{version}"]')
                return int(els[0].text) if els else 0

            # The numbers move as devices report: 3 of 6 on 2.0.0, the plots filling, no reload.
            wait.until(lambda _: on("2.0.0") == 3 and on("1.0.0") == 3)
            wait.until(lambda _: text("#count-waiting") == "3")
            updates = b.execute_script("return window.edgertUpdates")
            wait.until(lambda _: b.execute_script("return window.edgertUpdates") > updates + 2)
            time.sleep(3)  # a few more samples on the plots for the screenshot
            assert b.execute_script("return window.edgertLoadedAt") == loaded
            assert "created: canary of cls 1.0.0 -> 2.0.0" in text("#decisions")
            screenshot(b, shots / "console-rollout.png")

            # Abort from the page: button, confirmation dialog, the server signs.
            b.find_element(By.CSS_SELECTOR, 'button.act[data-action="abort"]').click()
            wait.until(lambda _: b.find_element(By.ID, "confirm").is_displayed())
            assert "Abort rollout 1" in text("#confirm-text")
            b.find_element(By.ID, "confirm-ok").click()
            wait.until(lambda _: "aborted" in b.find_element(By.ID, "toast").get_attribute("textContent"))
            wait.until(lambda _: text("#rollout-status") == "aborted")
            wait.until(lambda _: on("1.0.0") == DEVICES and on("2.0.0") == 0)
            assert "aborted from the console by the operator" in text("#rollout-reason")
            assert "rollback published: group web back to 1.0.0" in text("#decisions")
            assert b.execute_script("return window.edgertLoadedAt") == loaded  # never reloaded
            screenshot(b, shots / "console-aborted.png")
            # The driving controller process sees the abort and stops (exit 1: the rollout was aborted).
            assert driver.proc.wait(60) == 1, driver.output()
        finally:
            driver.stop()
        assert set(serving(broker, fleet).values()) == {"1.0.0"}

        # A device's page, reached from the rollout's table: its history shows the round trip.
        moved = b.find_elements(By.CSS_SELECTOR, "#parts a[href^='/devices/']")
        assert len(moved) == 3
        moved[0].click()
        wait.until(lambda _: "serving 2.0.0 -> 1.0.0" in text("#events"))
        assert "serving 1.0.0 -> 2.0.0" in text("#events")
        screenshot(b, shots / "console-device.png")
        b.get(console + "/")
        wait.until(lambda _: text("#n-online") == str(DEVICES))
        screenshot(b, shots / "console-fleet.png")


# --- what a browser would not send --------------------------------------------------------------


def test_actions_need_a_session_and_a_fresh_ticket(
    broker: Broker, fleet: dict[str, Path], keys: Path, console: str
) -> None:
    publish(broker, fleet, keys)
    created = subprocess.run(fleet_cli(broker, fleet, "rollout", "cls:2.0.0", "--group", "web", "--strategy",
                                       "canary", "--detach", "--json"), capture_output=True, text=True)  # fmt: skip
    assert created.returncode == 0, created.stderr
    rid = json.loads(created.stdout)["rollout"]

    def status() -> str:
        r = subprocess.run(fleet_cli(broker, fleet, "status", str(rid), "--json"), capture_output=True, text=True)
        return str(json.loads(r.stdout)["rollout"]["status"])

    # No session: no ticket, no action.
    assert post(console + "/actions/ticket", {"action": "abort", "rollout": rid})[0] == 403
    code, doc = post(console + "/actions", {"action": "abort", "rollout": rid, "ticket": "made-up"})
    assert code == 403 and "logged-in session" in doc["error"]
    assert login(console, "wrong-token-0123456789") is None
    cookie = login(console)
    assert cookie is not None
    # A made-up ticket, and a ticket for another action or rollout.
    code, doc = post(console + "/actions", {"action": "abort", "rollout": rid, "ticket": "x" * 32}, cookie)
    assert code == 403 and "not one this session was given" in doc["error"]
    t = post(console + "/actions/ticket", {"action": "promote", "rollout": rid}, cookie)[1]["ticket"]
    code, doc = post(console + "/actions", {"action": "abort", "rollout": rid, "ticket": t}, cookie)
    assert code == 403 and "another action or rollout" in doc["error"]
    # Another site's page posting with the operator's browser.
    code, doc = post(console + "/actions/ticket", {"action": "abort", "rollout": rid}, cookie, "http://evil.example")
    assert code == 403 and "cross-site" in doc["error"]
    # Malformed bodies name what was expected.
    code, doc = post(console + "/actions/ticket", {"action": "explode", "rollout": rid}, cookie)
    assert code == 400 and "one of" in doc["error"]
    assert status() == "running"

    # The real thing, once; the same request again does nothing.
    ticket = post(console + "/actions/ticket", {"action": "abort", "rollout": rid}, cookie)[1]["ticket"]
    body = {"action": "abort", "rollout": rid, "ticket": ticket}
    code, doc = post(console + "/actions", body, cookie)
    assert code == 200 and "aborted" in doc["message"], doc
    assert status() == "aborted"
    code, doc = post(console + "/actions", body, cookie)
    assert code == 409 and "replay" in doc["error"]
    # An aborted rollout cannot be aborted again (nothing republished).
    t2 = post(console + "/actions/ticket", {"action": "abort", "rollout": rid}, cookie)[1]["ticket"]
    code, doc = post(console + "/actions", {"action": "abort", "rollout": rid, "ticket": t2}, cookie)
    assert code == 409 and "nothing to abort" in doc["error"]
    r = subprocess.run(fleet_cli(broker, fleet, "status", str(rid), "--json", "--log", "50"), capture_output=True,
                       text=True)  # fmt: skip
    aborts = [d for d in json.loads(r.stdout)["decisions"] if d["message"].startswith("ABORT:")]
    assert len(aborts) == 1, aborts
    # Every refusal is counted where an operator sees it.
    metrics = get(console + "/metrics")[1]
    for reason in ("no_session", "bad_token", "bad_ticket", "cross_site", "replayed", "bad_request"):
        assert f'edgert_console_refused_total{{reason="{reason}"}}' in metrics, reason
    wait_for(lambda: set(serving(broker, fleet).values()) == {"1.0.0"}, 60, "every device back on 1.0.0")


def test_shadow_figures_side_by_side_then_promoted_from_the_console(
    broker: Broker, fleet: dict[str, Path], keys: Path, console: str
) -> None:
    publish(broker, fleet, keys)
    wait_for(lambda: set(serving(broker, fleet).values()) == {"1.0.0"}, 60, "every device on 1.0.0")
    # Driven until it observes: every device runs 2.0.0 beside 1.0.0 on the same inputs.
    r = subprocess.run(fleet_cli(broker, fleet, "rollout", "cls:2.0.0", "--group", "web", "--strategy", "shadow",
                                 "--health-window", "3", "--min-inferences", "5", "--json"),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rid = json.loads(r.stdout)["rollout"]["id"]

    def shadow_page() -> str | None:
        html = get(f"{console}/rollouts/{rid}")[1]
        rows = re.search(r'id="agreement">[0-9.]+%</strong> over ([0-9]+) rows', html)
        return html if rows and int(rows.group(1)) >= 20 else None

    page = wait_for(shadow_page, 60, "the shadow's figures on the rollout page")
    assert "shadow: per-version figures over" in page
    for title in ("top-1 class share per version", "latency per version", "error rate per version"):
        assert f"<title>{title}</title>" in page, title
    # The same model under two versions: they agree on every row.
    assert '<strong id="agreement">100.0%</strong>' in page
    cookie = login(console)
    assert cookie is not None
    ticket = post(console + "/actions/ticket", {"action": "promote", "rollout": rid}, cookie)[1]["ticket"]
    code, doc = post(console + "/actions", {"action": "promote", "rollout": rid, "ticket": ticket}, cookie)
    assert code == 200 and "promoted" in doc["message"], doc
    # The console drives the promoted version to every device and completes the rollout.
    wait_for(lambda: set(serving(broker, fleet).values()) == {"2.0.0"}, 90, "every device on 2.0.0")

    def status() -> str:
        out = subprocess.run(fleet_cli(broker, fleet, "status", str(rid), "--json"), capture_output=True, text=True)
        return str(json.loads(out.stdout)["rollout"]["status"])

    wait_for(lambda: status() == "completed", 90, "the promoted rollout to complete")
    assert "promoted 2.0.0 by the operator" in get(f"{console}/rollouts/{rid}")[1]
    # Roll it back from the console: the group returns to 1.0.0.
    ticket = post(console + "/actions/ticket", {"action": "rollback", "rollout": rid}, cookie)[1]["ticket"]
    code, doc = post(console + "/actions", {"action": "rollback", "rollout": rid, "ticket": ticket}, cookie)
    assert code == 200 and "rolled back" in doc["message"], doc
    wait_for(lambda: set(serving(broker, fleet).values()) == {"1.0.0"}, 90, "every device back on 1.0.0")


def test_html_from_a_device_is_shown_as_text(broker: Broker, console: str) -> None:
    """A device (or anyone with a device topic) names itself, its group and its version in HTML."""
    c = broker.client("controller")
    try:
        topic = f"edgert/v1/devices/{EVIL_ID}"
        status = {"device": EVIL_ID, "group": "<b>grp</b>", "online": True, "ts": time.time()}
        state = {"device": EVIL_ID, "group": "<b>grp</b>", "ts": time.time(),
                 "models": {"cls": {"version": EVIL_VERSION, "serving": EVIL_VERSION}}}  # fmt: skip
        c.publish(f"{topic}/status", json.dumps(status), qos=1, retain=True).wait_for_publish(10)
        c.publish(f"{topic}/state", json.dumps(state), qos=1, retain=True).wait_for_publish(10)
        wait_for(lambda: "&lt;img src=x" in get(console + "/")[1], 20, "the HTML device on the fleet page")
        page = get(console + "/")[1]
        assert "<img src=x" not in page and "<script>window" not in page and "<b>grp" not in page
        assert "&lt;script&gt;window.pwned=2&lt;/script&gt;" in page
        from urllib.parse import quote

        # Filters: by group, by model, by version (here the device's HTML version string).
        by_group = get(console + "/?group=" + quote("<b>grp</b>", safe=""))[1]
        assert "&lt;img src=x" in by_group and 'data-device="web-000"' not in by_group
        web = get(console + "/?group=web")[1]
        assert "&lt;img src=x" not in web and all(f'data-device="web-{i:03d}"' in web for i in range(DEVICES))
        by_version = get(console + "/?model=cls&version=" + quote(EVIL_VERSION, safe=""))[1]
        assert "&lt;img src=x" in by_version and 'data-device="web-000"' not in by_version
        assert "no device matches" in get(console + "/?model=nope")[1]
        code, device_page = get(console + "/devices/" + quote(EVIL_ID, safe=""))
        assert code == 200 and "&lt;img src=x onerror=window.pwned=1&gt;" in device_page
        assert "<img src=x" not in device_page
    finally:
        for kind in ("status", "state"):  # retained: remove them for later tests
            c.publish(f"edgert/v1/devices/{EVIL_ID}/{kind}", b"", qos=1, retain=True).wait_for_publish(10)
        c.loop_stop()
        c.disconnect()


def test_console_off_loopback_needs_a_token_file(broker: Broker, fleet: dict[str, Path]) -> None:
    r = edgert("fleet", "--broker", broker.controller_url, "--state", str(fleet["state"]), "console",
               "--host", "0.0.0.0", "--port", str(free_port()))  # fmt: skip
    assert r.returncode == 2
    assert "--token-file" in r.stderr and "0.0.0.0" in r.stderr
