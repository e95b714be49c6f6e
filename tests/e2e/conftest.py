"""The console in a real browser: Debian's Chromium driven by Playwright, and the servers it visits.

Playwright cannot download its own browser here, so it launches ``/usr/bin/chromium``
(``./dev test`` installs it when it may). Without it the tests skip, except under CI, which
must run them. Screenshots go to ``artifacts/e2e/`` at the repository root (git-ignored);
their paths are listed at the end of the run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from _pytest.terminal import TerminalReporter
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Dialog,
    Error,
    Page,
    expect,
    sync_playwright,
)

from devmeter.config import Settings
from devmeter.service import serve_in_thread

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "artifacts" / "e2e"
#: How long a page or an expectation may take: generous, since benchmarks may load the machine.
TIMEOUT_MS = 20_000


def until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll ``check`` until it holds; fail after ``timeout`` seconds saying what never happened."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# --- the browser -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        reason = (
            f"no {CHROMIUM}: the console's browser test needs Debian's chromium package "
            "(`./dev test` installs it when run as root; or `apt-get install chromium`)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}. CI must run this test.", pytrace=False)
        print(f"skipping: {reason}")  # noqa: T201 - the reason a person reads with -s
        pytest.skip(reason)
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Watch:
    """Everything a page said that a person would call broken: console errors (a blocked
    Content-Security-Policy shows as one), uncaught exceptions, and any alert() at all."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        said = f"console {message.type}: {message.text} ({message.location})"
        if message.type == "error":
            self.problems.append(said)
        elif message.type == "warning":
            self.warnings.append(said)

    def on_page_error(self, error: Error) -> None:
        self.problems.append(f"page error: {error}")

    def on_dialog(self, dialog: Dialog) -> None:
        self.problems.append(f"unexpected {dialog.type}: {dialog.message!r}")
        dialog.dismiss()


@dataclass
class Tab:
    page: Page
    watch: Watch
    name: str
    #: The test's report properties: they travel with the report, from xdist workers too.
    properties: list[tuple[str, object]]
    shots: list[Path] = field(default_factory=list)

    def shot(self, step: str, *, full_page: bool = True) -> Path:
        """Save a screenshot as ``artifacts/e2e/<test>-<nn>-<step>.png``."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.name}-{len(self.shots) + 1:02d}-{step}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        self.shots.append(path)
        self.properties.append(("screenshot", str(path)))
        print(f"screenshot: {path}")  # noqa: T201 - the brief: say where the artifacts are
        return path

    def assert_clean(self) -> None:
        for warning in self.watch.warnings:
            print(warning)  # noqa: T201 - worth a look, not a failure
        assert self.watch.problems == [], "\n".join(self.watch.problems)


@pytest.fixture
def tab(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Tab]:
    """A fresh browser context (own cookies) and page, watched for errors."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    # To check what "Copy key" put on the clipboard; writing needs no grant.
    context.grant_permissions(["clipboard-read"])
    page = context.new_page()
    watch = Watch()
    page.on("console", watch.on_console)
    page.on("pageerror", watch.on_page_error)
    page.on("dialog", watch.on_dialog)
    name = re.sub(r"^test_", "", request.node.name)
    try:
        # Not record_property: it warns (an error here) under --junitxml's default xunit2.
        yield Tab(page, watch, name, request.node.user_properties)
    finally:
        context.close()


def pytest_terminal_summary(terminalreporter: TerminalReporter) -> None:
    shots = [
        str(value)
        for reports in terminalreporter.stats.values()
        for report in reports
        for key, value in getattr(report, "user_properties", [])
        if key == "screenshot"
    ]
    if shots:
        terminalreporter.write_sep("-", "console screenshots")
        for path in dict.fromkeys(shots):
            terminalreporter.write_line(path)


# --- the servers -------------------------------------------------------------------------


@pytest.fixture
def console_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    """The real app (API and console) served by uvicorn on a free port, in a thread."""
    from api.app import create_app

    # data_dir: no runtime.json of a `devmeter up` in the working tree may leak in.
    config = Settings(env="test", data_dir=tmp_path)
    app = create_app(config, database_url=database_url)
    base, stop = serve_in_thread(app, "127.0.0.1", 0, name="console-e2e", ws="none")
    try:
        yield base
    finally:
        stop()


@dataclass
class Up:
    """A `devmeter up` subprocess with embedded servers, and the environment to reach it."""

    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str]
    cwd: Path
    console: str = ""

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, as Ctrl-C or an orchestrator would; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            pytest.fail(f"devmeter up did not stop on SIGTERM:\n{self.text()}")


@pytest.fixture
def up(cli_env: dict[str, str], tmp_path: Path) -> Iterator[Up]:
    env = {
        **cli_env,
        "DEVMETER_API_PORT": "0",
        "DEVMETER_INGEST_SHARE_GROUP": "",
        "DEVMETER_INGEST_CLIENT_ID": f"e2e-up-{uuid.uuid4().hex[:8]}",
    }
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devmeter", "up"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    running = Up(proc, log, env, tmp_path)
    try:
        until(
            lambda: "ready;" in running.text() or proc.poll() is not None,
            180,
            "devmeter up to be ready",
            interval=0.2,
        )
        assert proc.poll() is None, running.text()
        found = re.search(r"console at (http://127\.0\.0\.1:\d+)/console", running.text())
        assert found, running.text()
        running.console = found.group(1)
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
