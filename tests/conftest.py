"""Shared fixtures, and the set-up of the browser tests' Chromium (the ``chromium`` fixture)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (faster on a small shared machine), restoring the old count."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------- the browser tests' Chromium
#: How long the set-up may take to install a browser (apt-get update and install, or Playwright's download).
BROWSER_INSTALL_TIMEOUT = 900


def _run_step(cmd: list[str], log: Callable[[str], None]) -> str | None:
    """Run one set-up command; ``None`` when it succeeded, else why it did not (its last output line)."""
    log(f"browser set-up: {' '.join(cmd)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BROWSER_INSTALL_TIMEOUT, env=env,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{' '.join(cmd)}` did not run: {exc}"
    if done.returncode == 0:
        return None
    last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1][:300]
    return f"`{' '.join(cmd)}` exited {done.returncode}: {last}"


def _run_steps(steps: list[list[str]], log: Callable[[str], None]) -> str | None:
    """Run commands in turn, stopping at the first that fails; ``None`` when all succeeded, else why not."""
    for cmd in steps:
        why = _run_step(cmd, log)
        if why is not None:
            return why
    return None


def _install_steps() -> list[list[list[str]]]:
    """The ways to install a Chromium here, in order: Debian's (as root with apt-get), then Playwright's own."""
    ways = []
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        ways.append([["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                                                      "chromium"]])
    ways.append([[sys.executable, "-m", "playwright", "install", "chromium"]])
    return ways


def _launches(path: str) -> str | None:
    """``None`` when Playwright can start the Chromium at ``path`` headless, else why not."""
    from playwright.sync_api import Error, sync_playwright

    from lwcam.study.report import CHROMIUM_ARGS

    try:
        with sync_playwright() as pw:
            pw.chromium.launch(executable_path=path, headless=True, args=list(CHROMIUM_ARGS)).close()
    except Error as exc:
        return f"{path} does not start: {str(exc).splitlines()[0][:300]}"
    return None


def _find_or_install_browser(log: Callable[[str], None]) -> tuple[str | None, list[str]]:
    """A Chromium that starts: found, else installed where this machine allows; with the reasons of every miss."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None, ["Playwright for Python is not installed (pip install -e '.[dev]')"]
    from lwcam.study.report import find_browser

    misses: list[str] = []
    path = find_browser()
    if path is None:
        misses.append("no Chromium installed (neither /usr/bin/chromium nor Playwright's own)")
        for steps in _install_steps() if os.environ.get("LWCAM_INSTALL_BROWSER", "1") != "0" else []:
            failed = _run_steps(steps, log)
            path = find_browser()
            if path is not None:
                break
            misses.append(failed or f"`{' '.join(steps[-1])}` installed no Chromium that lwcam finds")
    if path is None:
        return None, misses
    why = _launches(path)
    return (None, [*misses, why]) if why else (path, misses)


#: What the browser set-up did, printed in pytest's summary (fixture output is captured, a summary is not).
_BROWSER_NOTES: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say which Chromium the browser tests used, and how it came to be there."""
    if _BROWSER_NOTES:
        terminalreporter.section("browser")
        for line in _BROWSER_NOTES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def chromium() -> str:
    """A headless Chromium for the browser tests (the path of its executable).

    Debian's ``/usr/bin/chromium`` or Playwright's own if either is installed; otherwise it is
    installed, as root with apt-get (Debian's ``chromium``) or else by ``python -m playwright
    install chromium`` (``LWCAM_INSTALL_BROWSER=0`` forbids installing). Where none can be had the
    browser tests skip with the reasons, and on CI (``CI=true``) they fail instead.
    """
    path, misses = _find_or_install_browser(_BROWSER_NOTES.append)
    if path is not None:
        _BROWSER_NOTES.append(f"browser tests: Chromium at {path}"
                              + (" (installed by this run)" if misses else " (found installed)"))
        return path
    reason = "no headless Chromium for the browser tests: " + "; ".join(misses)
    if os.environ.get("CI") == "true":
        pytest.fail(reason + " (CI=true: the browser tests must run)", pytrace=False)
    pytest.skip(reason)
