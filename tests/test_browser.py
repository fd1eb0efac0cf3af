"""The run report and the served page in a real headless Chromium (the system package, driven
by Selenium through the system chromedriver). Skipped, with the reason, where either is absent;
`make test` installs them with apt where it can."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from googlenet.infer.inference import load
from tests.conftest import free_port, make_checkpoint, make_run, png_bytes

pytestmark = pytest.mark.browser

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver", "/usr/lib/chromium/chromedriver")


def _which(names: tuple[str, ...]) -> str | None:
    for n in names:
        found = shutil.which(n) or (n if Path(n).is_file() else None)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    binary, driver = _which(BROWSERS), _which(DRIVERS)
    if binary is None or driver is None:
        pytest.skip(
            "no headless browser: install Chromium and its driver "
            "(apt-get install chromium chromium-driver)"
        )
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


def console_errors(drv) -> list[str]:
    return [e["message"] for e in drv.get_log("browser") if e["level"] == "SEVERE"]


def broken_images(drv) -> tuple[int, list[str]]:
    """(number of <img> elements, the alt texts of those that did not load)."""
    n, bad = drv.execute_script(
        "const imgs = [...document.images];"
        "return [imgs.length, imgs.filter(i => !(i.complete && i.naturalWidth > 0))"
        ".map(i => i.alt || i.src.slice(0, 40))];"
    )
    return n, bad


def test_report_opens_in_chromium_with_every_image_loaded(browser, tmp_path: Path):
    from googlenet.insight.report import write_report

    path = write_report(make_run(tmp_path / "run"))
    console_errors(browser)  # drop anything logged before
    browser.get(path.resolve().as_uri())
    n, bad = broken_images(browser)
    assert n >= 8 and not bad, bad
    assert "Most confident mistakes" in browser.find_element("tag name", "body").text
    assert console_errors(browser) == []


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    pytest.importorskip("multipart", reason="the serve extra is not installed")
    import uvicorn

    from googlenet.serve import create_app

    app = create_app(load(make_checkpoint(tmp_path / "best.safetensors")))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def test_served_page_shows_a_prediction_for_an_uploaded_image(browser, server, tmp_path: Path):
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "upload.png"
    image.write_bytes(png_bytes(5))
    console_errors(browser)
    browser.get(server + "/")
    browser.find_element("id", "file").send_keys(str(image))
    WebDriverWait(browser, 60).until(
        lambda d: d.find_elements("id", "prediction") or d.find_element("id", "error").text
    )
    assert browser.find_element("id", "error").text == ""
    label = browser.find_element("id", "prediction").text
    assert label.split(" ")[0] in ("cat", "dog", "ship")
    rows = browser.find_elements("css selector", "#top5 tr")
    assert len(rows) == 3  # a 3-class model: its whole top-5
    assert len(browser.find_elements("css selector", "#usage tr")) == 1 + 9
    WebDriverWait(browser, 20).until(lambda d: broken_images(d)[1] == [])
    assert broken_images(browser)[0] == 2  # the preview and the Grad-CAM overlay
    assert console_errors(browser) == []
