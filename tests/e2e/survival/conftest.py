"""Fixtures of the survival tests: one real mosquitto per module, one fleet key."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.broker import Broker
from tests.e2e.survival.helpers import ACCOUNTS


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("broker"), ACCOUNTS)
    yield b
    b.stop()
