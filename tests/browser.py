"""A real headless chromium (Debian's package) driven through Selenium and Debian's chromedriver:
no browser is downloaded at test time. Missing chromium fails, never skips (`make test` installs it)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@contextmanager
def chromium(width: int = 1440, height: int = 1000) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            raise AssertionError(f"{path} is missing: `make test` installs Debian's chromium and chromium-driver")
    profile = tempfile.mkdtemp(prefix="edgert-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", f"--user-data-dir={profile}", "--no-first-run",
                "--disable-background-networking", "--disable-extensions", "--hide-scrollbars"):  # fmt: skip
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: Any, out: Path) -> Path:
    """A full-page PNG (the window grown to the page's height first)."""
    height = driver.execute_script("return Math.max(document.body.scrollHeight, 600)")
    width = driver.get_window_size()["width"]
    driver.set_window_size(width, min(int(height) + 40, 4000))
    out.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(out))
    return out
