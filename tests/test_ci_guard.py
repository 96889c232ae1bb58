"""Under CI=true a missing test dependency fails the run instead of skipping silently (a browser that
could not be installed must not turn the panels' only real check into a green skip)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_browser_tests(ci: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CI=ci, PATH=str(Path(sys.executable).parent))  # no /usr/bin: no chromium
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_browser.py", "-p", "no:cacheprovider"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_ci_fails_in_one_line_without_the_browser():
    proc = run_browser_tests("true")
    assert proc.returncode == 3, proc.stdout[-2000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "CI=true and no Chromium" in line]
    assert len(lines) == 1 and "Traceback" not in proc.stdout + proc.stderr


def test_locally_it_skips_with_the_reason():
    proc = run_browser_tests("")
    assert proc.returncode == 0 and " skipped" in proc.stdout and " passed" not in proc.stdout, proc.stdout[-2000:]
