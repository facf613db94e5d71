"""The web app's browser tests' plumbing: the ``python -m sdtune.ui`` server process (start, kill,
restart on the same outputs folder), headless Debian Chromium through Selenium (never Selenium
Manager: nothing is downloaded), waiting on what a page shows, small PNG screenshots for
docs/images/, and plain HTTP calls for what a browser cannot see (status codes)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .paths import ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# The screenshots of the key pages go to a scratch folder, so a test run leaves the checkout as it was;
# `SDTUNE_SCREENSHOTS=docs/images pytest tests/ui/test_browser.py` refreshes the committed ones.
SCREENSHOTS = Path(os.environ.get("SDTUNE_SCREENSHOTS") or Path(tempfile.gettempdir()) / "sdtune-screenshots")
if not SCREENSHOTS.is_absolute():
    SCREENSHOTS = ROOT / SCREENSHOTS
URL_LINE = re.compile(r"sdtune ui: (http://\S+)")


def require_browser() -> None:
    """Skip (with the reason) when Chromium or its driver is missing; fail instead in CI
    (SDTUNE_REQUIRE_BROWSER=1), where a skipped browser test would hide a broken install."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if not missing:
        return
    reason = f"{', '.join(missing)} missing: apt-get install chromium chromium-driver (Debian's packages)"
    if os.environ.get("SDTUNE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"SDTUNE_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def child_env() -> dict[str, str]:
    """One environment for the server's jobs and the shell runs they are compared with: the same
    thread count (CPU sums depend on it) and unbuffered output (the log tail is live)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


class UiServer:
    """``python -m sdtune.ui --outputs OUTPUTS --port 0``; ``url`` is what it printed on start."""

    def __init__(self, outputs: Path, log: Path, args: tuple[str, ...] = ()):
        self.outputs, self.log, self.args = Path(outputs), Path(log), tuple(args)
        self.proc: subprocess.Popen | None = None
        self.url = ""  # http://127.0.0.1:PORT, without the ?token= the server prints when it has one

    def start(self, timeout: float = 60) -> str:
        self.url = ""
        out = open(self.log, "a", encoding="utf-8")
        out.write(f"\n--- start {time.strftime('%H:%M:%S')}\n")
        out.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sdtune.ui", "--outputs", str(self.outputs), "--port", "0", *self.args],
            cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=out, text=True, start_new_session=True)
        found = threading.Event()

        def pump(stream, sink):  # keep reading stdout (a full pipe would stall the server); catch the URL
            for line in stream:
                sink.write(line)
                sink.flush()
                match = URL_LINE.search(line)
                if match and not found.is_set():
                    self.url = match.group(1).split("?")[0].rstrip("/")
                    found.set()
            sink.close()

        threading.Thread(target=pump, args=(self.proc.stdout, out), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"sdtune.ui did not print its URL (exit {self.proc.poll()}):\n{self.log_text()[-3000:]}")
        return self.url

    def kill(self) -> None:
        """SIGKILL the server alone (a crash): the jobs it started are left as they are."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def restart(self) -> str:
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""


def kill_processes_under(folder: Path) -> list[int]:
    """SIGKILL every process of this user whose command line names ``folder`` (the jobs a test's
    server started there, also after the server itself was killed); the pids killed."""
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"{folder}/" in cmdline or f"{folder} " in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except ProcessLookupError:
                pass
    return killed


def start_browser(profile: Path):
    """Headless Debian Chromium with its own profile folder and nothing fetched from the network."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    return driver


def wait_for(check, timeout: float = 60, every: float = 0.2, what: str = "the page"):
    """Call ``check()`` until it returns something truthy (returned); AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except AssertionError:  # the check saw something that will not get better
            raise
        except Exception as error:  # an element replaced while read (stale) or not there yet
            last_error = error
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last_error!r})" if last_error else ""))


def screenshot(driver, name: str, height: int | None = None, element: str | None = None) -> Path:
    """The page as ``SCREENSHOTS/ui_<name>.png``: the full page height (up to 2400 px, or ``height``),
    or one ``element`` (CSS), reduced to a 256-colour palette so the committed file stays small."""
    from PIL import Image

    full = driver.execute_script("return Math.ceil(document.documentElement.scrollHeight)")
    size = driver.get_window_size()
    driver.set_window_size(size["width"], min(height or full + 140, 2400))
    try:
        png = (driver.find_element("css selector", element).screenshot_as_png if element
               else driver.get_screenshot_as_png())
    finally:
        driver.set_window_size(size["width"], size["height"])
    image = Image.open(io.BytesIO(png)).convert("RGB")
    path = SCREENSHOTS / f"ui_{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def http(url: str, method: str = "GET", body: dict | None = None) -> tuple[int, dict | str]:
    """An HTTP request outside the browser: (status, JSON answer or text). A write always sends a JSON
    body (the server refuses writes that are not JSON)."""
    if body is None and method not in ("GET", "HEAD"):
        body = {}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


class App:
    """A page of the app in the browser: ``go`` to a path of the server, find elements by CSS, read
    their text, wait for a run's state (failing at once, with the log tail, on an unexpected end)."""

    def __init__(self, server: UiServer, driver):
        self.server, self.driver = server, driver

    def go(self, path: str) -> None:
        self.driver.get(self.server.url + path)

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def finds(self, css: str) -> list:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        return self.find(css).text.strip()

    def loaded(self, image) -> bool:
        """An <img> that the browser decoded: natural width and height above 0."""
        return bool(self.driver.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0 && arguments[0].naturalHeight > 0", image))

    def api(self, path: str, method: str = "GET", body: dict | None = None):
        return http(self.server.url + path, method, body)

    def wait_state(self, wanted: str, timeout: float = 180) -> str:
        """Wait until the run page's #state reads ``wanted``; a different final state fails at once."""
        final = {"finished", "stopped", "failed", "interrupted", "cancelled"} - {wanted}

        def check():
            state = self.text("#state")
            if state in final:
                raise AssertionError(f"the run ended {state!r}, not {wanted!r}; log tail:\n{self.text('#log-tail')[-3000:]}")
            return state == wanted

        try:
            return wait_for(check, timeout, what=f"#state = {wanted}")
        except AssertionError as error:
            if "ended" in str(error):
                raise
            raise AssertionError(f"{error}; the page shows {self.text('#state')!r}, log tail:\n{self.text('#log-tail')[-3000:]}") from None
