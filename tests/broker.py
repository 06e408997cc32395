"""A real mosquitto (Debian's package) on a free loopback port, with the project's ACL and a
password per account; started and stopped by its PID. Missing mosquitto fails, never skips."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.conftest import REPO, free_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
CONTROLLER_ACCOUNTS = {"controller"}  # log in on the controllers' listener; every other account is a device


class Broker:
    def __init__(self, root: Path, accounts: dict[str, str], extra: str = "") -> None:
        if not os.path.exists(MOSQUITTO):
            raise AssertionError("mosquitto is not installed: `make test` installs Debian's mosquitto package")
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()  # devices
        self.controller_port = free_port()  # controllers and operator tools
        self.accounts = dict(accounts)
        pw, cpw = root / "passwd", root / "passwd-controllers"
        for f in (pw, cpw):
            f.touch()
        for user, password in accounts.items():
            target = cpw if user in CONTROLLER_ACCOUNTS else pw
            subprocess.run([PASSWD, "-b", str(target), user, password], check=True, capture_output=True)
        acl = REPO / "deploy/mosquitto/acl"
        # An extra listener for devices (TLS tests) gets the device listener's auth with {device_auth}.
        device_auth = f"allow_anonymous false\npassword_file {pw}\nacl_file {acl}\nuse_username_as_clientid true\n"
        conf = (REPO / "deploy/mosquitto/mosquitto.conf.template").read_text().format(
            port=self.port, controller_port=self.controller_port, bind="127.0.0.1", password_file=pw,
            controller_password_file=cpw, acl_file=acl, data_dir=root,
            extra=extra.replace("{device_auth}", device_auth) + ("\nuser root" if os.geteuid() == 0 else ""),
        )  # fmt: skip
        self.conf = root / "mosquitto.conf"
        self.conf.write_text(conf)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        """Where devices connect."""
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def controller_url(self) -> str:
        """Where controllers and operator tools connect."""
        return f"mqtt://127.0.0.1:{self.controller_port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited: {(self.root / 'mosquitto.log').read_text()}")
            time.sleep(0.05)
        raise AssertionError("mosquitto did not listen in 10 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self.proc = None

    def client(self, user: str, client_id: str | None = None, clean: bool = True) -> Any:
        import paho.mqtt.client as mqtt

        cid = client_id or f"{user}-{os.getpid()}-{time.monotonic_ns()}"
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        c.username_pw_set(user, self.accounts[user])
        connected = __import__("threading").Event()
        c.on_connect = lambda *a: connected.set() if not a[3].is_failure else None
        props = None
        if not clean:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        port = self.controller_port if user in CONTROLLER_ACCOUNTS else self.port
        c.connect("127.0.0.1", port, 30, clean_start=clean, properties=props)
        c.loop_start()
        if not connected.wait(10):
            raise AssertionError(f"{user} could not connect")
        return c
