"""End to end: the demo page in real headless Chromium against `zimage-server --http-port` (tiny preset).

Drives Debian's chromium through selenium and Debian's chromedriver (browsers cannot be
downloaded in CI). Skipped only where chromium is absent and CI is unset; in CI it must run.
Screenshots go to artifacts/ at the repository root.
"""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BIN", shutil.which("chromedriver") or "/usr/bin/chromedriver")
IN_CI = bool(os.environ.get("CI"))
os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not try to download a driver

if not IN_CI and not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium chromium-driver)", allow_module_level=True)
if not IN_CI:
    pytest.importorskip("selenium")

from conftest import free_port
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.timeout(300)

MIN_PREVIEW_UPDATES = 5
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1000")


def _get(url: str, timeout_s: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


@pytest.fixture(scope="module")
def server():
    """`python -m zimage_server.cli --model tiny --http-port P`: the CLI path a deployment uses."""
    ARTIFACTS.mkdir(exist_ok=True)
    http_port, metrics_port = free_port(), free_port()
    log_path = ARTIFACTS / "browser_e2e_server.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "zimage_server.cli", "--model", "tiny", "--host", "127.0.0.1", "--port", "0",
             "--http-host", "127.0.0.1", "--http-port", str(http_port), "--metrics-host", "127.0.0.1",
             "--metrics-port", str(metrics_port), "--max-batch-size", "1", "--max-steps", "200", "--drain-timeout-s", "2",
             # The queue test keeps the engine busy with a long request; its deadline must not refuse it
             # at admission on a slow (shared) CPU, where 200 steps at 1024² can exceed the 300 s default.
             "--default-timeout-ms", "3600000"],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT,
        )
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None, log_path.read_text()
        try:
            if _get(base + "/healthz", 1.0)[0] == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.2)
    yield base, f"http://127.0.0.1:{metrics_port}/metrics"
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="zimage-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def state(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def watch_preview(driver) -> None:
    """Record every src the preview <img> takes, as the page sets it."""
    driver.execute_script("""
        window.__srcs = [];
        const img = document.getElementById('preview');
        new MutationObserver(() => window.__srcs.push(img.src))
            .observe(img, {attributes: true, attributeFilter: ['src']});
    """)


def test_generate_then_cancel_in_chromium(server, browser):
    base, metrics_url = server
    driver = browser
    driver.get(base + "/")
    wait = WebDriverWait(driver, 60, poll_frequency=0.05)
    wait.until(lambda d: "tiny" in d.find_element(By.ID, "model").text)  # GET /v1/model answered
    before = _get(metrics_url)[1]

    def delta(text: str, name: str, **labels: str) -> float:
        return metric(text, name, **labels) - metric(before, name, **labels)

    # ---- run 1: prompt, Generate, live previews, the final image with its seed
    prompt = driver.find_element(By.ID, "prompt")
    prompt.send_keys("A red fox in fresh snow · 雪中的红狐狸")
    steps = driver.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("12")
    watch_preview(driver)
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: state(d) in ("done", "error"))
    assert state(driver) == "done", driver.find_element(By.ID, "status").text
    srcs = driver.execute_script("return window.__srcs")
    previews = [s for s in srcs if s.startswith("data:image/jpeg;base64,")]
    assert len(set(previews)) >= MIN_PREVIEW_UPDATES, f"{len(previews)} preview updates"
    assert srcs[-1].startswith("data:image/png;base64,")  # the final image came last
    preview = driver.find_element(By.ID, "preview")
    assert int(preview.get_attribute("data-preview-count")) == 12
    assert driver.execute_script("return document.getElementById('preview').naturalWidth") == 256
    seed_text = driver.find_element(By.ID, "final-seed").text
    assert re.match(r"seed \d+ · 256×256", seed_text), seed_text
    assert preview.get_attribute("data-seed") in seed_text
    driver.save_screenshot(str(ARTIFACTS / "browser_e2e_generated.png"))

    metrics = _get(metrics_url)[1]
    assert delta(metrics, "zimage_requests_total", rpc="HttpStream", code="OK") == 1

    # ---- run 2: a long generation, Cancel after the first preview, the slot is freed
    driver.find_element(By.XPATH, "//button[@class='size' and text()='1024×1024']").click()
    steps.clear()
    steps.send_keys("50")
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: int(d.find_element(By.ID, "preview").get_attribute("data-preview-count")) >= 1)
    assert state(driver) == "running"
    assert re.match(r"Step \d+/50 · ETA \d", driver.find_element(By.ID, "status").text)
    running = metric(_get(metrics_url)[1], "zimage_running_requests")
    assert running == 1
    driver.find_element(By.ID, "cancel").click()
    wait.until(lambda d: state(d) == "cancelled")
    driver.save_screenshot(str(ARTIFACTS / "browser_e2e_cancelled.png"))

    deadline = time.monotonic() + 30
    while True:
        metrics = _get(metrics_url)[1]
        if delta(metrics, "zimage_requests_total", rpc="HttpStream", code="CANCELLED") == 1:
            break
        assert time.monotonic() < deadline, metrics
        time.sleep(0.1)
    deadline = time.monotonic() + 30
    while metric(metrics, "zimage_running_requests") != 0:
        assert time.monotonic() < deadline, "the cancelled request kept its slot"
        time.sleep(0.1)
        metrics = _get(metrics_url)[1]
    assert metric(metrics, "zimage_queue_depth") == 0
    assert delta(metrics, "zimage_cancelled_requests_total", stage="running") == 1
    assert delta(metrics, "zimage_images_generated_total") == 1  # the cancelled run produced no image
    steps_done = delta(metrics, "zimage_steps_total")
    assert 12 < steps_done < 12 + 50, steps_done  # it stopped part-way

    # The page is usable again.
    assert driver.find_element(By.ID, "generate").is_enabled()
    assert not driver.find_element(By.ID, "cancel").is_enabled()


def test_frontends_doc_snippet_runs_in_chromium(server, browser):
    """The JavaScript of the README's "Frontends" section, run as written."""
    base, _ = server
    readme = (ROOT / "README.md").read_text()
    doc = readme[readme.index("## Frontends"):]
    snippet = re.search(r"```js\n(.*?)```", doc, re.DOTALL).group(1)
    browser.get(base + "/")
    result = browser.execute_async_script(snippet + """
        const done = arguments[arguments.length - 1];
        const seen = { queued: 0, steps: 0, previews: 0 };
        generate({ prompt: "a lighthouse in a storm", steps: 4,
                   onQueued: () => seen.queued++,
                   onStep: (step, total, preview) => { seen.steps++; if (preview) seen.previews++; },
                   onImage: (url, seed) => done({ seen, url: url.slice(0, 22), seed }),
                   onError: (error) => done({ error }) });
    """)
    assert "error" not in result, result
    assert result["seen"] == {"queued": 1, "steps": 4, "previews": 4}
    assert result["url"] == "data:image/png;base64,"
    assert result["seed"].isdigit()


def test_queue_position_then_cancel_while_waiting(server, browser):
    """With the engine busy (--max-batch-size 1), the page shows its place in the queue; Cancel frees it."""
    base, metrics_url = server
    before = _get(metrics_url)[1]
    host, port = base.removeprefix("http://").split(":")
    busy = http.client.HTTPConnection(host, int(port), timeout=60)
    busy.request("POST", "/v1/stream", json.dumps({"prompt": "keep the engine busy", "width": 1024,
                                                   "height": 1024, "steps": 200}),
                 {"Content-Type": "application/json"})
    reply = busy.getresponse()
    assert reply.status == 200
    while not reply.readline().startswith(b"event: started"):
        pass
    try:
        browser.get(base + "/")
        wait = WebDriverWait(browser, 60, poll_frequency=0.05)
        wait.until(lambda d: "tiny" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "prompt").send_keys("一只在竹林里喝茶的熊猫")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: state(d) == "queued")
        assert "next in line" in browser.find_element(By.ID, "status").text
        assert metric(_get(metrics_url)[1], "zimage_queue_depth") == 1
        browser.save_screenshot(str(ARTIFACTS / "browser_e2e_queued.png"))
        browser.find_element(By.ID, "cancel").click()
        wait.until(lambda d: state(d) == "cancelled")
        deadline = time.monotonic() + 30
        while True:
            metrics = _get(metrics_url)[1]
            cancelled = (metric(metrics, "zimage_cancelled_requests_total", stage="queued")
                         - metric(before, "zimage_cancelled_requests_total", stage="queued"))
            if cancelled == 1 and metric(metrics, "zimage_queue_depth") == 0:
                break
            assert time.monotonic() < deadline, metrics
            time.sleep(0.05)
        assert metric(metrics, "zimage_running_requests") == 1  # the busy request was not disturbed
    finally:
        busy.close()  # and this one is cancelled by its disconnect
    deadline = time.monotonic() + 30
    while metric(_get(metrics_url)[1], "zimage_running_requests") != 0:
        assert time.monotonic() < deadline, "the disconnected request kept its slot"
        time.sleep(0.05)


def test_image_drop_zone_sends_an_img2img_request(server, browser, tmp_path):
    """Issue 15: a start image chosen in the drop zone goes out as initImage (base64) with the strength
    slider's value; the server runs only the steps image-to-image runs (strength 0.6 of 4 steps: 3)."""
    from PIL import Image

    base, metrics_url = server
    driver = browser
    driver.get(base + "/")
    wait = WebDriverWait(driver, 60, poll_frequency=0.05)
    wait.until(lambda d: "tiny" in d.find_element(By.ID, "model").text)
    picture = tmp_path / "start.png"
    Image.new("RGB", (256, 256), (200, 80, 40)).save(picture)
    chooser = driver.find_element(By.ID, "init-file")
    driver.execute_script("arguments[0].hidden = false;", chooser)  # the drop zone opens it on click
    chooser.send_keys(str(picture))
    wait.until(lambda d: d.find_element(By.ID, "init-controls").is_displayed())
    assert driver.find_element(By.ID, "init-thumb").get_attribute("src").startswith("data:image/png;base64,")
    driver.find_element(By.ID, "prompt").send_keys("a red fox, watercolour")
    steps = driver.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("4")
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: state(d) in ("done", "error"))
    assert state(driver) == "done", driver.find_element(By.ID, "status").text
    assert int(driver.find_element(By.ID, "preview").get_attribute("data-preview-count")) == 3
    driver.save_screenshot(str(ARTIFACTS / "browser_e2e_img2img.png"))
    driver.find_element(By.ID, "init-clear").click()
    assert not driver.find_element(By.ID, "init-controls").is_displayed()
