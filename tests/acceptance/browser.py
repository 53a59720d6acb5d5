"""Headless Chromium (Debian's chromium and chromium-driver) driven by Selenium, for the
console's tests; screenshots of each page are kept as test artifacts."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from tests.support import ROOT, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("CONVEYOR_TEST_ARTIFACTS", ROOT / "var" / "test-artifacts"))
DESKTOP = (1280, 900)
PHONE = (390, 844)


def require_chromium() -> None:
    """Fail with one line when the browser the console's tests need is not installed."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not shutil.which(path):
            raise RuntimeError(
                f"{path} is missing: apt-get install {package} (.ci/run installs it)"
            )


class Browser:
    """One headless Chromium session against a console at `base`."""

    def __init__(self, driver: webdriver.Chrome, base: str, shots: Path) -> None:
        self.driver = driver
        self.base = base
        self.shots = shots

    def open(self, path: str) -> None:
        """Load a console path."""
        self.driver.get(self.base + path)

    def find(self, css: str) -> WebElement:
        """The first element matching a CSS selector."""
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str) -> list[WebElement]:
        """Every element matching a CSS selector."""
        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def text(self) -> str:
        """The visible text of the page."""
        return str(self.driver.find_element(By.TAG_NAME, "body").text)

    def wait_for(self, check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
        """Wait until `check` answers truthy; an element replaced under it is read again."""

        def probe() -> Any:
            try:
                return check()
            except (StaleElementReferenceException, WebDriverException):
                return None

        return wait_until(probe, timeout=timeout, interval=0.2, what=what)

    def wait_text(self, text: str, timeout: float = 30.0) -> None:
        """Wait until the page shows `text`."""
        self.wait_for(lambda: text in self.text(), f"the page to show {text!r}", timeout)

    def sign_in(self, key: str) -> None:
        """Sign in through the form (the one on screen, or a fresh one)."""
        if "/ui/login" not in self.driver.current_url:
            self.open("/ui/login")
        self.find("#key").send_keys(key)
        self.find("#sign-in").click()
        self.wait_for(lambda: "/ui/login" not in self.driver.current_url, "the sign-in")

    def sign_out(self) -> None:
        """Sign out with the header's button."""
        self.find("button.link").click()
        self.wait_for(lambda: "/ui/login" in self.driver.current_url, "the sign-out")

    def shot(self, name: str) -> Path:
        """A full-page screenshot, kept as an artifact."""
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        width = self.driver.get_window_size()["width"]
        height = int(self.driver.execute_script("return document.documentElement.scrollHeight"))
        self.driver.set_window_size(width, min(max(height + 140, 600), 4000))
        self.driver.save_screenshot(str(path))
        return path

    def resize(self, size: tuple[int, int]) -> None:
        """Set the window's size (a phone's width, or a desktop's)."""
        self.driver.set_window_size(*size)

    def overflows(self) -> bool:
        """Whether the page is wider than the window (content a phone would cut off)."""
        return bool(
            self.driver.execute_script(
                "return document.documentElement.scrollWidth > window.innerWidth + 1"
            )
        )


@contextmanager
def chromium(base: str, shots: Path) -> Iterator[Browser]:
    """A headless Chromium session, closed afterwards."""
    require_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield Browser(driver, base, shots)
    finally:
        driver.quit()
