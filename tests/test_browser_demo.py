"""The interactive demo used the way a person uses it: JupyterLab in a real (headless) Chromium.

What happens:

1. JupyterLab starts on 127.0.0.1 at a free port, with a random token, serving a temporary copy of ``notebooks/``.
   Its kernels get ``FLORENCE2_MODEL=teaching`` (the offline teaching model, so the screenshot shows a right answer
   on its scene), ``FLORENCE2_MODELS_DIR`` = a temporary folder and ``FLORENCE2_DEVICE=CPU``. Config, settings, workspaces and
   runtime files go to temporary folders too, so your own JupyterLab setup is neither used nor changed.
2. Playwright's Python client drives Debian's Chromium (``/usr/bin/chromium``; Playwright never downloads a
   browser here): open ``10_interactive_demo.ipynb``, Run > Run All Cells, wait until every cell has run
   without an error and the demo widget is on the page.
3. Like a user: choose "Phrase grounding" in the task dropdown (the text box must become enabled), press Run with
   an empty text (a red error box must appear and say a text is needed), type a phrase, press Run again (the
   button must show "Running…"), then wait for the drawing and the answer JSON, which must ground every phrase of the
   teaching scene's caption.
4. A screenshot goes to the test's temporary folder; with ``UPDATE_SCREENSHOT=1`` it is also copied to
   ``docs/demo.png`` (the README's picture).

Every wait has a timeout, and the server (with its kernel) is always stopped. Without Chromium the test is
skipped with a warning that says how to install it; ``.ci/run`` installs it when run as root.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.course.samples import teaching_scene
from helpers.course.teaching.scenes import caption, groups

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = "10_interactive_demo.ipynb"
SCREENSHOT = REPO / "docs" / "demo.png"
#: Flags Chromium needs here: run as root without a sandbox, no GPU, and no calls home (the network is closed).
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SERVER_START_TIMEOUT = 90  # s
NOTEBOOK_RUN_TIMEOUT = 240  # s: all cells, including converting the teaching model
ANSWER_TIMEOUT = 120  # s: one press of Run
#: The teaching scene's own caption: the teaching model grounds each of its phrases (a right answer to show).
SCENE = teaching_scene()
PHRASES = tuple(group.phrase for group in groups(SCENE))
PHRASE = caption(SCENE)
TASK_LABEL = "Phrase grounding"
TASK = "<CAPTION_TO_PHRASE_GROUNDING>"

#: JupyterLab settings for the run: no news/update pop-ups over the screenshot; every cell kept in the page; the
#: notebook's kernel (python3) started without the "Select Kernel" dialog.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {
        "windowingMode": "none",
        "autoStartDefaultKernel": True,
    },
}


def _skip_loudly(reason: str) -> None:
    """Skips are easy to miss in pytest's summary; a warning is always listed."""
    warnings.warn(f"BROWSER TEST SKIPPED: {reason}", UserWarning, stacklevel=2)
    pytest.skip(f"BROWSER TEST SKIPPED: {reason}")


def find_chromium() -> str | None:
    """``FLORENCE2_CHROMIUM`` if set, else ``chromium`` on PATH, else Debian's ``/usr/bin/chromium``."""
    for candidate in (os.environ.get("FLORENCE2_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LabServer:
    url: str
    token: str
    root: Path
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (server and kernels), then SIGKILL whatever is left."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # kernels that outlived the server
    except ProcessLookupError:
        pass
    if process.poll() is None:
        process.wait(timeout=10)


@pytest.fixture
def lab_server(tmp_path: Path) -> Iterator[LabServer]:
    """JupyterLab on 127.0.0.1 serving a temporary copy of notebooks/, stopped whatever happens."""
    root = tmp_path / "notebooks"
    shutil.copytree(REPO / "notebooks", root, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "models"))
    settings = tmp_path / "lab-settings"
    for name, values in LAB_SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(values))
    port, token = _free_port(), os.urandom(16).hex()
    env = {
        **os.environ,
        "FLORENCE2_MODEL": "teaching",
        "FLORENCE2_MODELS_DIR": str(tmp_path / "converted"),
        "FLORENCE2_DEVICE": "CPU",
        "HF_HUB_OFFLINE": "1",
        "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = tmp_path / "jupyterlab.log"
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]  # fmt: skip
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, env=env, cwd=root, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    server = LabServer(f"http://127.0.0.1:{port}", token, root, log)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"JupyterLab exited with code {process.returncode}:\n{server.log_tail()}")
            try:
                with urllib.request.urlopen(f"{server.url}/api/status?token={token}", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer within {SERVER_START_TIMEOUT} s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        _stop(process)


@pytest.fixture
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        _skip_loudly(
            "Chromium not found (looked for $FLORENCE2_CHROMIUM, `chromium` on PATH, /usr/bin/chromium). "
            "Install Debian's package: `apt-get install -y chromium` (.ci/run does this when run as root)."
        )
    return path


def test_demo_in_jupyterlab(chromium_path: str, lab_server: LabServer, tmp_path: Path):
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _skip_loudly("the `playwright` package is missing: `pip install -r requirements.txt` installs it "
                     "(never run `playwright install`; the test uses the system Chromium).")  # fmt: skip

    screenshot = tmp_path / "demo.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True, timeout=60_000
        )
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1250}, device_scale_factor=1)
            page = context.new_page()
            page.set_default_timeout(30_000)
            console_errors: list[str] = []
            page.on("console", lambda message: message.type == "error" and console_errors.append(message.text))

            # --- open the notebook and run every cell -------------------------------------------------------
            page.goto(f"{lab_server.url}/lab/tree/{NOTEBOOK}?token={lab_server.token}", timeout=60_000)
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
            # The kernel has started: the status bar names it and says Idle ("No Kernel | Initializing" before;
            # choosing Run All then would open the "Select Kernel" dialog instead of running anything).
            expect(page.locator(".jp-StatusBar-Widget", has_text=re.compile(r"Python 3.*\| Idle"))).to_be_visible(
                timeout=90_000
            )
            page.locator("li.lm-MenuBar-item", has_text="Run").first.click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

            demo = page.locator(".florence2-demo")
            expect(demo).to_be_visible(timeout=NOTEBOOK_RUN_TIMEOUT * 1000)
            # Wait for the last cells: the error demonstration prints this, then no cell may still be queued.
            expect(page.get_by_text("a file that does not exist:")).to_be_attached(timeout=NOTEBOOK_RUN_TIMEOUT * 1000)
            page.wait_for_function(
                """() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
                          .every(p => /\\[\\d+\\]/.test(p.textContent) || p.closest('.jp-CodeCell')
                                       .textContent.includes('NBVAL_SKIP'))""",
                timeout=NOTEBOOK_RUN_TIMEOUT * 1000,
            )
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                                  has_text="Traceback")  # fmt: skip
            assert errors.count() == 0, f"a cell failed:\n{errors.first.inner_text()}"

            run = demo.locator("button.florence2-run")
            image = demo.locator("img.florence2-output-image")
            answer = demo.locator(".florence2-answer")
            error_box = demo.locator(".florence2-error")
            text = demo.locator(".florence2-text input")
            # Nothing clicked yet: the notebook's own checks call the function, not the button.
            assert image.evaluate("img => img.naturalWidth") == 0 and answer.inner_text().strip() == ""
            expect(text).to_be_disabled()  # <OD> takes no text

            # --- pick a task that takes text; the text box opens ---------------------------------------------
            demo.locator(".florence2-task select").select_option(label=TASK_LABEL)
            expect(text).to_be_enabled(timeout=15_000)
            expect(demo.locator(".florence2-hint")).to_contain_text("Type a caption", timeout=15_000)

            # --- Run without the text: the error shows inside the widget ----------------------------------
            run.click()
            expect(error_box).to_be_visible(timeout=ANSWER_TIMEOUT * 1000)
            expect(error_box).to_contain_text("needs a text input")

            # --- type a phrase and Run: busy indicator, then drawing + JSON --------------------------------
            text.fill(PHRASE)
            text.press("Tab")  # leave the box, as a user would
            # Record whether the button ever shows the busy state (a MutationObserver sees every DOM change).
            run.evaluate(
                """button => {
                       window.florence2SawBusy = false;
                       const check = () => {
                           const busy = button.disabled && button.textContent.includes('Running');
                           if (busy) window.florence2SawBusy = true;
                       };
                       new MutationObserver(check).observe(button, {attributes: true, childList: true, subtree: true,
                                                                    characterData: true});
                   }"""
            )
            run.click()
            expect(demo.locator(".florence2-time")).to_contain_text("Answered in", timeout=ANSWER_TIMEOUT * 1000)
            assert page.evaluate("window.florence2SawBusy"), "the Run button never showed 'Running…' while it ran"
            expect(run).to_be_enabled(timeout=15_000)
            expect(run).to_have_text("Run")
            expect(error_box).to_be_hidden()
            expect(answer).to_contain_text(TASK, timeout=15_000)
            expect(answer).to_contain_text('"bboxes"')
            for phrase in PHRASES:  # a right answer: every phrase of the scene's caption gets its box
                expect(answer).to_contain_text(f'"{phrase}"')
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(),
                                   timeout=15_000)  # fmt: skip
            width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            assert (width, height) == SCENE.image.size, "the drawing is the teaching scene with the answer"
            box = image.bounding_box()
            assert box and box["width"] > 100 and box["height"] > 100, f"drawing not visible on screen: {box}"

            # --- screenshot -----------------------------------------------------------------------------------
            page.keyboard.press("Escape")
            file_browser = page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
            if file_browser.count():
                file_browser.first.click()  # fold the file browser away: more room for the demo
            demo.evaluate("element => element.scrollIntoView({block: 'start'})")
            page.wait_for_timeout(300)
            bottom = demo.evaluate("element => element.getBoundingClientRect().bottom")
            height = min(1250, int(bottom) + 16)  # the window from its menu bar down to the end of the demo
            page.screenshot(path=str(screenshot), clip={"x": 0, "y": 0, "width": 1400, "height": height})
        finally:
            browser.close()

    assert screenshot.stat().st_size > 10_000, "the screenshot is suspiciously small"
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(screenshot, SCREENSHOT)
    print(f"screenshot: {screenshot}")
    assert not [e for e in console_errors if "florence2" in e.lower()], console_errors
