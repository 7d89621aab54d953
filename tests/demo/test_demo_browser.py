"""The web demo end to end in a real browser: `honeybee-demo` serves the tiny model the README's demo trains
(examples/caption_demo.py: it knows the five photos' captions) on 127.0.0.1; headless Chromium (Debian's `chromium`
and `chromium-driver`, driven by selenium) uploads a photo, asks for a caption, reads the streamed answer from the
page, opens the visual-token view and checks that the map is rendered. Screenshots go to `$HONEYBEE_SCREENSHOTS`
(the README's come from there) or the test's temporary folder.

Runs in the `web` environment (Gradio 6 pins pillow <13, which tf4/tf5 do not have); `scripts/run_tests.sh` runs it
there and installs the browser when it may (root). Elsewhere it skips, saying what is missing.
"""

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from utils import PHOTO_DIR, REPO

for module, why in [("gradio", "Gradio"), ("selenium", "selenium")]:
    if importlib.util.find_spec(module) is None:
        pytest.skip(
            f"{why} is not installed here: the browser test runs in .venvs/web (bash scripts/setup_envs.sh web; "
            "scripts/run_tests.sh runs it there)",
            allow_module_level=True,
        )
BROWSER, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (BROWSER and DRIVER):
    pytest.skip(
        "no headless Chromium: install Debian's packages (apt-get install chromium chromium-driver; "
        "scripts/run_tests.sh does when run as root)",
        allow_module_level=True,
    )

from PIL import Image  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from honeybee_hf.pipeline_honeybee import CAPTION_QUESTION  # noqa: E402

PHOTO = "mug_ad.jpeg"
WAIT = 90  # seconds any one step may take on a loaded 2-core machine (the server's start included)


def _caption_demo():
    spec = importlib.util.spec_from_file_location("caption_demo", REPO / "examples" / "caption_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The README demo's tiny model, taught the captions; (folder, captions)."""
    demo = _caption_demo()
    work = tmp_path_factory.mktemp("caption_demo")
    assert demo.main(["--out", str(work)]) == len(demo.CAPTIONS)  # it learned them, through the pipeline
    return work / "run" / "model", demo.CAPTIONS


@pytest.fixture
def server(trained, tmp_path):
    """`honeybee-demo` on 127.0.0.1 in its own process group, killed (with anything it started) at the end."""
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "honeybee_hf.demo.app", "--model", str(trained[0]), "--host", "127.0.0.1",
         "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the app did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--disable-extensions", "--window-size=1180,900", "--js-flags=--max-old-space-size=256"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver, name, tmp_path):
    """A small PNG (128-colour palette) of the page, in $HONEYBEE_SCREENSHOTS or the test's folder."""
    folder = Path(os.environ.get("HONEYBEE_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    raw = tmp_path / f"{name}.raw.png"
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(raw))
    with Image.open(raw) as page:
        page.convert("RGB").quantize(128).save(folder / f"{name}.png", optimize=True)
    return folder / f"{name}.png"


def test_the_app_captions_an_uploaded_photo_and_shows_a_token_map(trained, server, browser, tmp_path):
    _, captions = trained
    wait = WebDriverWait(browser, WAIT)
    find = lambda css: browser.find_element(By.CSS_SELECTOR, css)
    browser.get(server)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"))
    find("#photo input[type=file]").send_keys(str(PHOTO_DIR / PHOTO))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photo img"))
    # Greedy decoding and no n-gram ban: the taught caption is the model's most likely answer, token by token.
    find("#sampling button").click()  # open the accordion
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#decoding"))
    find("#decoding").find_element(By.XPATH, ".//label[contains(., 'greedy')]").click()
    no_repeat = find("#no-repeat input[type=number]")
    no_repeat.clear()
    no_repeat.send_keys("0\n")
    find("#question textarea").send_keys(CAPTION_QUESTION)
    find("#send").click()

    seen = []  # every answer text the page showed while streaming

    def answered(driver):
        answers = driver.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot]")
        text = answers[-1].text.strip() if answers else ""
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        return text == captions[PHOTO]

    try:
        wait.until(answered)
    except Exception:
        raise AssertionError(f"the page showed {seen!r}, not {captions[PHOTO]!r}; status: {find('#status').text!r}")
    assert find("#chat [data-testid=user]").text.strip() == CAPTION_QUESTION
    assert all(captions[PHOTO].startswith(text) for text in seen)  # every streamed state was a prefix
    find("#sampling button").click()  # closed again, for the screenshot
    screenshot(browser, "demo_chat", tmp_path)

    tab = [t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if "visual token" in t.text]
    assert tab, "no visual-token tab"
    tab[0].click()
    wait.until(lambda d: find("#show-map").is_displayed())
    find("#show-map").click()
    rendered = "return arguments[0].complete && arguments[0].naturalWidth"
    wait.until(
        lambda d: any(d.execute_script(rendered, img) for img in d.find_elements(By.CSS_SELECTOR, "#token-map img"))
    )
    width = max(
        browser.execute_script(rendered, img) for img in browser.find_elements(By.CSS_SELECTOR, "#token-map img")
    )
    with Image.open(PHOTO_DIR / PHOTO) as original:
        assert width == original.width  # the overlay is drawn on the uploaded photo itself
    assert find("#token-caption").text.startswith("token 4 (row 1, column 1 of 3x3)")
    screenshot(browser, "demo_token_map", tmp_path)

    [t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text == "Chat"][0].click()
    wait.until(lambda d: find("#clear").is_displayed())
    find("#clear").click()
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot], #chat [data-testid=user]"))
