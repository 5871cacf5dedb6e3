"""The browser page (issue 32): ``ssd-web`` serves only the page and the bundle; the page, in
Debian's headless Chromium driven by Selenium, samples the same images as the Python
runtime from the same noise, shows the resolution growing, and refuses a changed graph."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, edit_manifest, run_main
from ssd_runtime import web_page
from ssd_runtime.web_page import ORT_FILES, PAGE_FOLDER, serve_in_thread, write_noise_file

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ORT_INSTALLED = all((PAGE_FOLDER / web_page.ORT_PACKAGE / name).is_file() for name in ORT_FILES)
needs_ort = pytest.mark.skipif(not ORT_INSTALLED, reason="ONNX Runtime Web is not installed (npm ci --prefix "
                                                         "runtime/web; make test does)")
STEPS, SEED, N = 25, 5, 3


@pytest.fixture(scope="module")
def tiny(bundles):
    return bundles[3][1]


@pytest.fixture(scope="module")
def server(tiny):
    if not ORT_INSTALLED:
        pytest.skip("ONNX Runtime Web is not installed (npm ci --prefix runtime/web; make test does)")
    server, url = serve_in_thread(tiny)
    yield url
    server.shutdown()
    server.server_close()


def get(url: str, method: str = "GET"):
    """``(status, headers, body)`` of one request."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


# --------------------------------------------------------------------------- the step plans
def test_the_step_plans_are_the_processs_own_value_for_value():
    from ssd_core.config import make_config
    from ssd_core.method import ScaleSpace
    from ssd_core.schema import ConfigError
    from ssd_core.step_plans import check_plans, plans_section

    space = ScaleSpace.from_config(make_config("tiny32", 3))
    plans = json.loads(json.dumps(plans_section(space)))  # as a manifest holds them
    assert sorted(check_plans(plans, space)) == [25, 50, 100, 250, 1000]
    for steps, rows in check_plans(plans, space).items():
        for row, step in zip(rows, space.plan(steps)):
            assert row[:2] == [step.t, step.route]
            np.testing.assert_array_equal(np.float32(row[2]), step.coefficients())  # exact in float32

    def changed(edit):
        copy = json.loads(json.dumps(plans))
        edit(copy)
        return copy

    bad = [
        (lambda p: p["25"][4].__setitem__(0, p["25"][4][0] + 1), r"plans\.25\[4\]"),
        (lambda p: p["25"][0].__setitem__(1, "keep_32"), r"plans\.25\[0\]"),
        (lambda p: p["25"][2][2].__setitem__(0, float("nan")), r"plans\.25\[2\]"),
        (lambda p: p["25"][2][2].__setitem__(0, True), r"plans\.25\[2\]"),
        (lambda p: p["25"].pop(), r"plans\.25: expected 25 steps"),
        (lambda p: p.update({"2": []}), r"plans\.2: steps=2"),
        (lambda p: p.update({"x1": []}), r"key 'x1' is not a step count"),
    ]
    for edit, pattern in bad:
        with pytest.raises(ConfigError, match=pattern):
            check_plans(changed(edit), space)


def test_format_5_carries_plans_and_older_bundles_still_load_in_python(tmp_path, tiny):
    from ssd_core.bundle import BundleError, load_bundle
    from ssd_runtime import Sampler

    for version, edit, pattern in [(5, lambda m: m.pop("plans"), "needs them"),
                                   (4, lambda m: m.update(format_version=4), "format_version 4 has no plans")]:
        copy = tmp_path / f"v{version}"
        shutil.copytree(tiny, copy)
        edit_manifest(copy, edit)
        with pytest.raises(BundleError, match=pattern):
            load_bundle(copy)
    old = tmp_path / "old"
    shutil.copytree(tiny, old)
    edit_manifest(old, lambda m: (m.pop("plans"), m.update(format_version=3)))
    with Sampler.from_bundle(old, backend="onnxruntime", warmup=False) as sampler:
        assert sampler.sample(1, seed=0, steps=STEPS).shape == (1, 32, 32, 3)
    with pytest.raises(BundleError, match="has no step plans"):
        load_bundle(old).step_plans()


# --------------------------------------------------------------------------- the server
def test_the_server_answers_only_for_the_page_ort_and_the_bundles_files(server, tiny):
    manifest = json.loads((tiny / "manifest.json").read_text())
    served = ["", "index.html", "page.mjs", "ssd-web.mjs", "style.css", "ort/ort.wasm.min.mjs",
              "ort/ort-wasm-simd-threaded.wasm", "bundle/manifest.json", "bundle/onnx/weights.bin",
              *(f"bundle/{route['step_files']['onnx']['path']}" for route in manifest["routes"])]
    for path in served:
        status, headers, body = get(server + path)
        assert status == 200 and body, path
        assert headers["Cross-Origin-Opener-Policy"] == "same-origin"  # WASM threads need isolation
        assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    assert get(server + "bundle/manifest.json")[2] == (tiny / "manifest.json").read_bytes()
    assert get(server + "ort/ort-wasm-simd-threaded.wasm")[1]["Content-Type"] == "application/wasm"
    refused = ["bundle/", "bundle/onnx/", "ort/", "bundle/../manifest.json", "../pyproject.toml",
               "%2e%2e/%2e%2e/pyproject.toml", "bundle/%2e%2e/%2e%2e/run/state.json", "//etc/passwd",
               "web_page.py", "package.json", "node_modules/onnxruntime-web/package.json", "ort/ort.all.min.mjs",
               "bundle/torchscript/keep_8.pt", "bundle/onnx/keep_8.onnx.bak", "bundle/run/state.json"]
    for path in refused:
        assert get(server + path)[0] == 404, path
    assert get(server + "index.html", "POST")[0] == 405
    assert get(server + "index.html?x=1#y")[0] == 200


@needs_ort
@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_ssd_web_prints_its_address_serves_and_stops_on_ctrl_c_or_sigterm(tiny, stop):
    import signal
    import subprocess
    import sys

    # SIGINT ignored, as a shell leaves it for a background job: Ctrl-C must stop it all the same
    process = subprocess.Popen([sys.executable, "-m", "ssd_runtime.web_page", str(tiny), "--port", "0", "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        line = process.stdout.readline()
        assert line.startswith("ssd-web: serving ") and "(Ctrl-C stops it)" in line
        url = line.split(" at ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and get(url)[0] == 200
        process.send_signal(getattr(signal, stop))
        assert process.wait(timeout=20) == 0 and process.stderr.read() == ""
    finally:
        process.kill()


def test_a_bundle_file_swapped_for_a_link_or_grown_is_not_served(tmp_path, tiny):
    if not ORT_INSTALLED:
        pytest.skip("ONNX Runtime Web is not installed")
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny, bundle)
    warnings = []
    server, url = serve_in_thread(bundle, warn=warnings.append)
    try:
        graph = bundle / "onnx" / "keep_8.step.onnx"
        outside = tmp_path / "secret.onnx"
        outside.write_bytes(b"secret")
        graph.unlink()
        graph.symlink_to(outside)
        status, _, body = get(url + "bundle/onnx/keep_8.step.onnx")
        assert status == 403 and b"secret" not in body and str(tmp_path).encode() not in body
        assert "is a link to" in warnings[-1] and "outside" in warnings[-1]
        graph.unlink()
        weights = bundle / "onnx" / "weights.bin"
        weights.write_bytes(weights.read_bytes() + b"\0")
        status, _, body = get(url + "bundle/onnx/weights.bin")
        assert status == 403 and "larger than its manifest" in warnings[-1]
    finally:
        server.shutdown()
        server.server_close()


def test_ssd_web_refuses_bundles_the_page_cannot_run_in_one_line(capsys, tmp_path, tiny):
    old = tmp_path / "v4"
    shutil.copytree(tiny, old)
    edit_manifest(old, lambda m: (m.pop("plans"), m.update(format_version=4)))
    assert_one_line_error(run_main(web_page.main, [str(old)], capsys), r"has no step plans .*ssd-export --force")

    changed = tmp_path / "changed"
    shutil.copytree(tiny, changed)
    edit_manifest(changed, lambda m: m["plans"]["25"][3][2].__setitem__(0, m["plans"]["25"][3][2][0] * (1 + 1e-6)))
    assert_one_line_error(run_main(web_page.main, [str(changed)], capsys),
                          r"malformed: plans\.25\[3\]: .* is not the process's step")

    page = tmp_path / "page"
    page.mkdir()
    for name in ("index.html", "page.mjs"):
        shutil.copy(PAGE_FOLDER / name, page / name)
    with pytest.raises(web_page.WebError, match=r"ONNX Runtime Web is not installed .*npm ci --prefix"):
        web_page.serve(tiny, 0, page)


def test_the_noise_file_holds_the_python_runtimes_streams(tmp_path, tiny):
    from ssd_core.bundle import load_bundle
    from ssd_core.method import SampleNoise, sample_loop

    path = write_noise_file(tmp_path / "noise.bin", tiny, SEED, N, STEPS, first=2)
    data = path.read_bytes()
    assert data[:8] == b"SSDNOISE"
    length = int.from_bytes(data[8:12], "little")
    header = json.loads(data[12:12 + length])
    plan = load_bundle(tiny).space.plan(STEPS)
    drawn = []  # what the sampling loop itself draws, in order

    class Recording(SampleNoise):
        def draw(self, size):
            drawn.append(size)
            return super().draw(size)

    recording = Recording(SEED, range(1), 3)
    zeros = lambda step, x, z: (np.zeros((1, 3, step.out_size, step.out_size), np.float32),) * 2
    for _ in sample_loop(plan, zeros, recording.draw(plan[0].in_size), recording):
        pass
    assert header["sizes"] == drawn
    floats = np.frombuffer(data[12 + length:], "<f4").reshape(N, header["floats_per_sample"])
    noise = SampleNoise(SEED, range(2, 2 + N), 3)
    first, second = noise.draw(8), noise.draw(header["sizes"][1])
    np.testing.assert_array_equal(floats[:, :192], first.reshape(N, -1))
    np.testing.assert_array_equal(floats[:, 192:192 + second[0].size], second.reshape(N, -1))


# --------------------------------------------------------------------------- in Chromium
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed (make test installs them as root)")
    pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra has it)")
    driver = web_page.headless_chromium(tmp_path_factory.mktemp("chromium"), CHROMIUM, CHROMEDRIVER)
    yield driver
    driver.quit()


def open_page(browser, url: str) -> None:
    browser.get(url)
    wait_for(browser, ("ready", "error"))


def wait_for(browser, states, timeout: float = 300) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, timeout, poll_frequency=0.2).until(
        lambda driver: driver.execute_script("return window.ssd && window.ssd.state") in states)
    return browser.execute_script("return window.ssd.state")


def sample_on_page(browser, seed: int, steps: int, n: int, batch: int, noise: Path | None = None) -> dict:
    """Fill the form, press Sample, wait, and return ``window.ssd.last``."""
    from selenium.webdriver.common.by import By

    if noise is not None:
        browser.execute_script("document.querySelector('details').open = true")
        browser.find_element(By.ID, "noise-file").send_keys(str(noise))
        browser.execute_script("return 1")  # the change event's handler reads the file
    for field, value in (("seed", seed), ("count", n), ("batch", batch)):
        browser.execute_script("document.getElementById(arguments[0]).value = arguments[1]", field, str(value))
    browser.execute_script("document.getElementById('steps').value = arguments[0]", str(steps))
    if noise is not None:  # the file is read asynchronously
        from selenium.webdriver.support.ui import WebDriverWait
        WebDriverWait(browser, 30).until(lambda d: d.execute_script("return !!window.ssd.noise"))
    browser.find_element(By.ID, "sample").click()
    state = wait_for(browser, ("done", "error"))
    assert state == "done", browser.execute_script("return window.ssd.message")
    return browser.execute_script("return window.ssd.last")


def page_images(last: dict) -> np.ndarray:
    size = last["size"]
    return np.frombuffer(base64.b64decode(last["images"]), np.uint8).reshape(last["n"], size, size, 3)


@needs_ort
def test_the_page_samples_pythons_images_from_pythons_noise(browser, server, tiny, tmp_path):
    from ssd_runtime import Sampler

    noise = write_noise_file(tmp_path / "noise.bin", tiny, SEED, N, STEPS)
    open_page(browser, server)
    info = browser.execute_script("return window.ssd.info")
    assert info["crossOriginIsolated"] and info["backend"] == "wasm" and STEPS in info["steps"]
    last = sample_on_page(browser, SEED, STEPS, N, batch=2, noise=noise)
    images = page_images(last)
    with Sampler.from_bundle(tiny, backend="onnxruntime", precision="fp32") as sampler:
        assert sampler.backend.fused
        expected = sampler.sample(N, seed=SEED, steps=STEPS, batch=2)
    difference = np.abs(images.astype(int) - expected.astype(int))
    assert difference.max() <= 1, difference.max()
    assert (difference == 0).mean() > 0.99
    # the PNGs the page offers are those images
    pngs = [np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
            for url in last["pngs"]]
    np.testing.assert_array_equal(np.stack(pngs), images)
    # the resolution grows live: previews at 16 and 32 before the last step, drawn at each size
    events = last["events"]
    previews = [(e["resolution"], e["step"]) for e in events if e["kind"] == "preview"]
    assert [r for r, _ in previews[:2]] == [16, 32] and all(step < STEPS - 1 for _, step in previews)
    drawn = {e["resolution"] for e in events if e["kind"] == "draw" and e["step"] < STEPS - 1}
    assert drawn == {8, 16, 32}


@needs_ort
def test_the_pages_own_seeded_noise_is_reproducible_per_sample(browser, server):
    open_page(browser, server)
    first = page_images(sample_on_page(browser, 7, STEPS, 2, batch=2))
    again = page_images(sample_on_page(browser, 7, STEPS, 2, batch=1))  # another batch: the same samples
    other = page_images(sample_on_page(browser, 8, STEPS, 2, batch=2))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 5


@needs_ort
def test_a_changed_graph_is_refused_on_the_page_in_one_visible_line(browser, tmp_path, tiny):
    from selenium.webdriver.common.by import By

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny, bundle)
    graph = bundle / "onnx" / "keep_16.step.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 1  # same size, another hash
    graph.write_bytes(bytes(data))
    server, url = serve_in_thread(bundle)
    try:
        browser.get(url)
        assert wait_for(browser, ("ready", "error")) == "error"
        message = browser.find_element(By.ID, "message")
        assert message.is_displayed()
        assert "\n" not in message.text
        assert message.text.startswith("onnx/keep_16.step.onnx: sha256 ") and "refusing to run it" in message.text
        assert not browser.find_element(By.ID, "sample").is_enabled()
    finally:
        server.shutdown()
        server.server_close()


@needs_ort
def test_the_shipped_model_samples_garments_on_the_page(browser, tmp_path):
    """Also writes the README's screenshot where SSD_WEB_SCREENSHOT names a file."""
    from ssd_runtime.default_model import packaged_bundle

    server, url = serve_in_thread(packaged_bundle())
    try:
        open_page(browser, url)
        last = sample_on_page(browser, 0, 25, 8, batch=8)
        images = page_images(last)
        assert images.shape == (8, 32, 32, 3) and images.std() > 20  # garments, not a flat field
        shot = Path(os.environ.get("SSD_WEB_SCREENSHOT") or tmp_path / "page.png")
        browser.save_screenshot(str(shot))
        assert Image.open(shot).size[0] > 500
    finally:
        server.shutdown()
        server.server_close()
