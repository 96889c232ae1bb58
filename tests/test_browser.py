"""The panels in a real browser: JupyterLab in headless Chromium (Debian's), driven by Playwright.

Each test opens a curated notebook in a fresh Lab, runs all cells, moves a control the way a person
would (keyboard on the slider handle, a dropdown choice) and checks that the numbers and the heat map
drawn in the page changed. Screenshots go to test-artifacts/ (not committed).
"""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "test-artifacts"
VISIBLE = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook on screen, not one in a background tab
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

try:  # without it every test here is skipped (or, under CI=true, the run fails): see conftest.REQUIREMENTS
    from playwright import sync_api
except ImportError:
    sync_api = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab of its own: temporary home, config, runtime and settings; a copy of the notebooks."""
    base = tmp_path_factory.mktemp("lab")
    root = base / "notebooks"
    shutil.copytree(ROOT / "notebooks", root)
    settings = base / "settings"
    news = settings / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = _free_port(), uuid.uuid4().hex
    env = dict(os.environ, HOME=str(base), JUPYTER_CONFIG_DIR=str(base / "config"),
               JUPYTER_RUNTIME_DIR=str(base / "runtime"), JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(base / "workspaces"), WORKBENCH_SMOKE="1",
               WORKBENCH_CACHE=os.environ.get("WORKBENCH_CACHE", str(Path.home() / ".cache" / "workbench")))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start")
        yield url, token
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@contextlib.contextmanager
def _notebook(browser, lab, notebook: str):
    """The notebook open in a fresh page with all cells run; afterwards a screenshot, and its kernel gone."""
    page = _open_and_run(browser, lab, notebook)
    try:
        yield page
    finally:
        _shot(page, f"last_{Path(notebook).stem}")
        page.close()
        _shutdown_kernels(lab)


def _press(page, handle_css: str, key: str) -> None:
    """A key on a slider's handle (ipywidgets 8 sliders are noUiSlider), as a person moving it would."""
    handle = page.locator(handle_css)
    handle.scroll_into_view_if_needed()
    handle.focus()
    page.keyboard.press(key)


def _open_and_run(browser, lab, notebook: str):
    url, token = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    # a workspace of its own, reset: Lab would otherwise reopen the tabs of the previous tests
    page.goto(f"{url}/lab/workspaces/{Path(notebook).stem}/tree/{notebook}?reset&token={token}")
    # "Run All" before the kernel is ready is silently ignored: wait for the status bar to say Idle
    page.wait_for_selector("text=Python 3 (ipykernel) | Idle", timeout=120_000)
    for _ in range(3):  # a click that lands while Lab is still laying out the notebook can be lost
        page.click("li.lm-MenuBar-item:has-text('Run')")
        page.click("li.lm-Menu-item:has-text('Run All Cells')")
        try:  # the first cell's prompt turns into [*] or a number once the kernel takes the work
            page.wait_for_selector(f"{VISIBLE} .jp-InputPrompt:has-text('[*]'), {VISIBLE} .jp-InputPrompt:has-text('[1]')",
                                   timeout=20_000)
            break
        except sync_api.TimeoutError:
            continue
    return page


def _value(page, css: str) -> str:
    return page.inner_text(css).strip()


def _wait_changed(page, css: str, before: str, timeout: float = 90_000) -> str:
    page.wait_for_function("([sel, old]) => { const e = document.querySelector(sel); "
                           "return e && e.innerText.trim() !== old; }", arg=[css, before], timeout=timeout)
    return _value(page, css)


def _plot_mean(page, box_css: str, trace: int = 0) -> float:
    """Mean of a drawn heat map's finite z values, read from the plotly graph div in the page."""
    return page.evaluate("""([sel, i]) => { const gd = document.querySelector(sel + ' .js-plotly-plot');
        const z = gd.data[i].z.flat().filter(v => v !== null && Number.isFinite(v));
        return z.reduce((a, b) => a + b, 0) / Math.max(1, z.length); }""", [box_css, trace])


def _shutdown_kernels(lab):
    url, token = lab
    kernels = json.load(urllib.request.urlopen(f"{url}/api/kernels?token={token}"))
    for k in kernels:
        req = urllib.request.Request(f"{url}/api/kernels/{k['id']}?token={token}", method="DELETE")
        urllib.request.urlopen(req)


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=False)


def test_sparsity_tuner_in_the_browser(browser, lab):
    with _notebook(browser, lab, "01_quickstart.ipynb") as page:
        panel = ".wb-sparsitytuner"
        kld = f"{panel} .wb-metric-kld .wb-value"
        page.wait_for_selector(kld, timeout=240_000)
        page.wait_for_selector(f"{panel} .wb-sparsity-map .js-plotly-plot", timeout=60_000)
        page.locator(f"{panel} .wb-sparsity-map").scroll_into_view_if_needed()
        before, map_before = _value(page, kld), _plot_mean(page, f"{panel} .wb-sparsity-map")
        _press(page, f"{panel} .wb-sparsity-slider .noUi-handle", "PageUp")  # a larger sparsity
        after = _wait_changed(page, kld, before)
        page.wait_for_function("sel => !document.querySelector(sel).innerText.includes('working')",
                               arg=f"{panel} .wb-status", timeout=60_000)
        map_after = _plot_mean(page, f"{panel} .wb-sparsity-map")
        _shot(page, "sparsity_tuner")
        assert float(after) > float(before)  # quality cost of sparsity appears
        assert map_after > map_before + 0.05  # the layer x token map recoloured
        assert "topk" in _value(page, f"{panel} .wb-metric-policy .wb-value")


def test_precision_tuner_in_the_browser(browser, lab):
    with _notebook(browser, lab, "04_mixed_precision.ipynb") as page:
        panel = ".wb-precisiontuner"
        mib = f"{panel} .wb-metric-weight_mib .wb-value"
        page.wait_for_selector(mib, timeout=300_000)
        page.locator(panel).scroll_into_view_if_needed()
        before = _value(page, mib)
        page.select_option(f"{panel} .wb-format select", "int8")
        after = _wait_changed(page, mib, before)
        _shot(page, "precision_tuner")
        assert float(after) < 0.5 * float(before)
        assert _value(page, f"{panel} .wb-metric-policy .wb-value") == "int8"


def test_attention_explorer_in_the_browser(browser, lab):
    with _notebook(browser, lab, "03_sparse_attention.ipynb") as page:
        panel = ".wb-attentionexplorer"
        recall = f"{panel} .wb-metric-recall .wb-value"
        page.wait_for_selector(recall, timeout=300_000)
        page.wait_for_selector(f"{panel} .wb-attention-map .js-plotly-plot", timeout=60_000)
        page.locator(f"{panel} .wb-attention-map").scroll_into_view_if_needed()
        before = _value(page, recall)
        _press(page, f"{panel} .wb-attention-budget .noUi-handle", "Home")  # the smallest budget
        after = _wait_changed(page, recall, before)
        _shot(page, "attention_explorer")
        assert float(after) < float(before)  # fewer keys kept, less attention mass kept
        assert _plot_mean(page, f"{panel} .wb-attention-map", trace=1) > 0  # dropped keys drawn in red


def test_lora_trainer_in_the_browser(browser, lab):
    with _notebook(browser, lab, "06_lora_finetune.ipynb") as page:
        panel = ".wb-loratrainer"
        page.wait_for_selector(f"{panel} .wb-lora-loss .js-plotly-plot", timeout=300_000)
        page.locator(panel).scroll_into_view_if_needed()
        points = "sel => (document.querySelector(sel + ' .js-plotly-plot').data[0].y || []).length"
        assert page.evaluate(points, f"{panel} .wb-lora-loss") == 0
        # clicked while later cells still run, the click waits its turn in the kernel: then training starts
        page.click(f"{panel} .wb-lora-start button, {panel} button.wb-lora-start")
        page.wait_for_function(f"sel => ({points})(sel) >= 2", arg=f"{panel} .wb-lora-loss", timeout=300_000)
        _shot(page, "lora_trainer_running")
        page.wait_for_function("sel => document.querySelector(sel).innerText.includes('trained')",
                               arg=f"{panel} .wb-status", timeout=300_000)
        _shot(page, "lora_trainer")
        steps = page.evaluate(points, f"{panel} .wb-lora-loss")
        assert steps >= 2 and "step" in _value(page, f"{panel} .wb-lora-progress")
        assert "→" in _value(page, f"{panel} .wb-metric-exact_match .wb-value")  # before → after answers scored
        assert "after" in _value(page, f"{panel} .wb-lora-answers")


def test_scheduler_dashboard_in_the_browser(browser, lab):
    with _notebook(browser, lab, "05_scheduler_and_serving.ipynb") as page:
        panel = ".wb-schedulerdashboard"
        page.wait_for_selector(f"{panel} .wb-scheduler-plots .js-plotly-plot", timeout=300_000)
        page.locator(panel).scroll_into_view_if_needed()
        # plotly draws the element before its traces are all there (a CI run read data[1] as undefined)
        traces = "sel => (document.querySelector(sel + ' .js-plotly-plot').data || []).length"
        page.wait_for_function(f"sel => ({traces})(sel) >= 2", arg=f"{panel} .wb-scheduler-plots", timeout=300_000)
        points = "sel => (document.querySelector(sel + ' .js-plotly-plot').data[1].y || []).length"
        assert page.evaluate(points, f"{panel} .wb-scheduler-plots") == 0
        page.click(f"{panel} button.wb-load-start, {panel} .wb-load-start button")  # runs after the queued cells
        page.wait_for_function(f"sel => ({points})(sel) >= 3", arg=f"{panel} .wb-scheduler-plots", timeout=300_000)
        _shot(page, "scheduler_dashboard_running")
        page.wait_for_function("sel => document.querySelector(sel).innerText.includes('load finished')",
                               arg=f"{panel} .wb-status", timeout=300_000)
        _shot(page, "scheduler_dashboard")
        running = page.evaluate("sel => document.querySelector(sel + ' .js-plotly-plot').data[1].y",
                                f"{panel} .wb-scheduler-plots")
        assert max(running) >= 1  # requests were seen decoding
        assert int(_value(page, f"{panel} .wb-metric-requests .wb-value")) >= 1
