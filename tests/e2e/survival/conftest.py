"""Fixtures of the survival tests: one real mosquitto per module, one fleet key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_runtime.contracts.bundle import generate_keypair
from tests.broker import Broker
from tests.e2e.survival.helpers import ACCOUNTS


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("broker"), ACCOUNTS)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def fleet_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fleet")
    generate_keypair(d)
    return d
