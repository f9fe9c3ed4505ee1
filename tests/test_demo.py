"""The demo (demo.py, demo.html): its JSON answers against the Python API, every kind of bad request, many clients at
once, Ctrl-C and a port in use on the command line, and a real headless Chromium drawing a digit with pointer events.

One small untrained model and one server serve the whole module; the browser test skips where no Chromium,
chromedriver or selenium is installed (`apt-get install chromium chromium-driver`, `pip install selenium`).
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import anomaly
import checkpoint
import data
import demo
import train
from model import VAE, VAEConfig

ROOT = Path(__file__).resolve().parent.parent
CONFIG = VAEConfig(latent_dim=8, channels=(8, 8), hidden_dim=32)
# Pen strokes as fractions of the drawing's side: eight different "digits".
STROKES = [
    [(0.3, 0.2), (0.7, 0.2), (0.4, 0.8)],  # 7
    [(0.5, 0.15), (0.5, 0.85)],  # 1
    [(0.5, 0.2), (0.3, 0.5), (0.5, 0.8), (0.7, 0.5), (0.5, 0.2)],  # 0
    [(0.3, 0.3), (0.5, 0.2), (0.7, 0.3), (0.3, 0.8), (0.7, 0.8)],  # 2
    [(0.3, 0.2), (0.7, 0.3), (0.4, 0.5), (0.7, 0.7), (0.3, 0.8)],  # 3
    [(0.6, 0.85), (0.6, 0.15), (0.25, 0.6), (0.75, 0.6)],  # 4
    [(0.7, 0.2), (0.3, 0.2), (0.3, 0.5), (0.7, 0.6), (0.3, 0.8)],  # 5
    [(0.3, 0.5), (0.7, 0.2), (0.6, 0.8), (0.4, 0.8), (0.3, 0.5)],  # a loop
]


def drawing(points, size: int = 112, width: float = 9.0) -> torch.Tensor:
    """A pen stroke through `points`, dark ink on white as a canvas holds it, anti-aliased by distance to the stroke."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    p = torch.stack([xs, ys], -1).reshape(-1, 1, 2)
    pts = torch.as_tensor(points, dtype=torch.float32) * size
    a, ab = pts[:-1], pts[1:] - pts[:-1]
    t = (((p - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-9)).clamp(0, 1)
    dist = (p - (a + t[..., None] * ab)).norm(dim=-1).min(1).values
    return 1 - (width / 2 - dist + 0.5).clamp(0, 1).reshape(size, size)


def body(gray: torch.Tensor) -> dict:
    return {"width": gray.shape[1], "height": gray.shape[0], "pixels": gray.flatten().tolist()}


@pytest.fixture(scope="module")
def model_and_reference():
    """A tiny untrained model with a small anomaly reference, a latent map and test scores, as training stores them."""
    torch.manual_seed(0)
    model = VAE(CONFIG).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.stack([data.prepare_digit(drawing(torch.rand(4, 2, generator=gen) * 0.6 + 0.2, 56)) for _ in range(64)])
    reference = anomaly.fit_reference(model, x[:40], x[40:], samples=2, local_steps=5)
    with torch.inference_mode():
        mu, _ = model.encode(x)
    mean = mu.mean(0)
    axes = torch.linalg.svd(mu - mean).Vh[:2].T
    reference["latent_map"] = {"mean": mean, "axes": axes, "points": (mu - mean) @ axes, "labels": torch.arange(64) % 10}
    reference["test_scores"] = anomaly.score(model, x[40:], reference=reference).sort().values
    return model, reference


@pytest.fixture(scope="module")
def app(model_and_reference) -> demo.Demo:
    return demo.Demo(*model_and_reference)


@pytest.fixture(scope="module")
def server(app) -> int:
    """One demo server on a free port, serving from a thread of this process: its port."""
    srv = demo.make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def request(port: int, method: str, path: str, payload: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON answer). Headers are sent exactly as given: no Content-Length is added."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders(payload)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def post(port: int, path: str, obj) -> tuple[int, dict]:
    payload = json.dumps(obj).encode()
    return request(port, "POST", path, payload, {"Content-Type": "application/json", "Content-Length": str(len(payload))})


def test_digit_answer_matches_the_python_api(server, model_and_reference):
    model, reference = model_and_reference
    gray = drawing(STROKES[0])
    status, answer = post(server, "/api/digit", body(gray))
    assert status == 200, answer
    x = data.prepare_digit(gray)[None]
    torch.testing.assert_close(torch.tensor(answer["prepared"])[None, None], x, atol=1e-4, rtol=0)
    expected = anomaly.score(model, x, samples=10, seed=0, reference=reference).item()
    assert answer["method"] == anomaly.DEFAULT_METHOD
    assert answer["score"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert answer["percentile"] == pytest.approx(100 * (reference["test_scores"] <= answer["score"]).double().mean().item())
    with torch.inference_mode():
        mu, _ = model.encode(x)
        reconstruction = torch.sigmoid(model.decode(mu))
    torch.testing.assert_close(torch.tensor(answer["z"]), mu[0])
    torch.testing.assert_close(torch.tensor(answer["reconstruction"])[None, None], reconstruction, atol=1e-4, rtol=0)
    m = reference["latent_map"]
    torch.testing.assert_close(torch.tensor(answer["point"]), (mu[0] - m["mean"]) @ m["axes"])


def test_map_decode_and_samples(server, model_and_reference):
    model, reference = model_and_reference
    status, info = request(server, "GET", "/api/map")
    assert status == 200 and info["latent_dim"] == 8 and len(info["points"]) == len(info["labels"]) == 64
    assert [d["name"] for d in info["directions"]][:2] == ["map axis 1", "map axis 2"] and len(info["directions"]) == 6
    for d in info["directions"]:
        assert len(d["vector"]) == 8 and torch.tensor(d["vector"]).norm().item() == pytest.approx(1, abs=1e-5) and d["scale"] > 0
    z = torch.linspace(-1, 1, 8)
    status, answer = post(server, "/api/decode", {"z": z.tolist()})
    assert status == 200
    with torch.inference_mode():
        expected = torch.sigmoid(model.decode(z[None]))
    torch.testing.assert_close(torch.tensor(answer["image"])[None, None], expected, atol=1e-4, rtol=0)
    status, samples = request(server, "GET", "/api/samples?n=16&seed=3")
    assert status == 200 and len(samples["images"]) == 16
    expected = model.sample(16, torch.Generator().manual_seed(3))
    torch.testing.assert_close(torch.tensor(samples["images"])[:, None], expected, atol=1e-4, rtol=0)
    assert request(server, "GET", "/api/samples?n=16&seed=4")[1]["images"] != samples["images"]


def test_a_checkpoint_without_a_reference_is_scored_by_elbo_with_no_percentile(model_and_reference):
    model, _ = model_and_reference
    bare = demo.Demo(model, None)
    answer = bare.digit(drawing(STROKES[1]))
    x = data.prepare_digit(drawing(STROKES[1]))[None]
    assert answer["method"] == "elbo" and answer["percentile"] is None
    assert answer["score"] == pytest.approx(anomaly.score(model, x, "elbo", samples=10, seed=0).item(), rel=1e-5)
    info = bare.map_and_sliders()
    assert info["points"] == [] and [d["scale"] for d in info["directions"]] == [1.0] * 6
    assert answer["point"] == pytest.approx(answer["z"][:2])  # the map falls back to the first two latent dimensions


def json_headers(payload: bytes) -> dict:
    return {"Content-Type": "application/json", "Content-Length": str(len(payload))}


BLANK = json.dumps(body(torch.ones(28, 28))).encode()
TINY = json.dumps({"width": 4, "height": 4, "pixels": [0.5] * 16}).encode()
BAD_REQUESTS = {  # name: (method, path, body, headers or None for JSON ones, expected status)
    "malformed JSON": ("POST", "/api/digit", b'{"width": 28,', None, 400),
    "not an object": ("POST", "/api/digit", b"[1, 2, 3]", None, 400),
    "not UTF-8": ("POST", "/api/digit", b'{"z": "\xff\xfe"}', None, 400),
    "deeply nested": ("POST", "/api/decode", b"[" * 100_000, None, 400),
    "wrong size": ("POST", "/api/digit", json.dumps({"width": 28, "height": 28, "pixels": [0.5] * 783}).encode(), None, 400),
    "2-D pixels": ("POST", "/api/digit", json.dumps({"width": 2, "height": 2, "pixels": [[0, 1], [1, 0]]}).encode(), None, 400),
    "width not a number": ("POST", "/api/digit", json.dumps({"width": "28", "height": 28, "pixels": [0] * 784}).encode(), None, 400),
    "huge width": ("POST", "/api/digit", json.dumps({"width": 10**9, "height": 10**9, "pixels": []}).encode(), None, 400),
    "pixel out of range": ("POST", "/api/digit", json.dumps({"width": 28, "height": 28, "pixels": [1.5] * 784}).encode(), None, 400),
    "pixel not a number": ("POST", "/api/digit", json.dumps({"width": 28, "height": 28, "pixels": ["a"] * 784}).encode(), None, 400),
    "NaN pixel": ("POST", "/api/digit", b'{"width": 2, "height": 1, "pixels": [NaN, 0]}', None, 400),
    "Infinity in z": ("POST", "/api/decode", b'{"z": [Infinity, 0, 0, 0, 0, 0, 0, 0]}', None, 400),
    "overflowing z": ("POST", "/api/decode", b'{"z": [1e999, 0, 0, 0, 0, 0, 0, 0]}', None, 400),
    "huge integer in z": ("POST", "/api/decode", b'{"z": [' + b"9" * 400 + b', 0, 0, 0, 0, 0, 0, 0]}', None, 400),
    "z far too large": ("POST", "/api/decode", b'{"z": [1e30, 0, 0, 0, 0, 0, 0, 0]}', None, 400),
    "z of the wrong length": ("POST", "/api/decode", b'{"z": [0, 0, 0]}', None, 400),
    "z missing": ("POST", "/api/decode", b'{"code": [0, 0, 0, 0, 0, 0, 0, 0]}', None, 400),
    "blank drawing": ("POST", "/api/digit", BLANK, None, 422),
    "drawing too small": ("POST", "/api/digit", TINY, None, 422),
    "unknown path": ("GET", "/nope", None, {}, 404),
    "unknown API path": ("POST", "/api/nope", b"{}", None, 404),
    "GET on a POST route": ("GET", "/api/digit", None, {}, 405),
    "POST on a GET route": ("POST", "/api/map", b"{}", None, 405),
    "PUT": ("PUT", "/", b"{}", None, 405),
    "DELETE": ("DELETE", "/api/decode", None, {}, 405),
    "samples n=0": ("GET", "/api/samples?n=0", None, {}, 400),
    "samples n=1000": ("GET", "/api/samples?n=1000", None, {}, 400),
    "samples n=abc": ("GET", "/api/samples?n=abc", None, {}, 400),
    "samples seed=-1": ("GET", "/api/samples?seed=-1", None, {}, 400),
    "samples seed of 5,000 digits": ("GET", "/api/samples?seed=" + "9" * 5000, None, {}, 400),  # int() refuses it
    "samples n=superscript 2": ("GET", "/api/samples?n=%C2%B2", None, {}, 400),  # a digit to isdigit(), not to int()
    "no Content-Length": ("POST", "/api/decode", None, {"Content-Type": "application/json"}, 411),
    "Content-Length not a number": ("POST", "/api/decode", None, {"Content-Length": "abc"}, 400),
    "negative Content-Length": ("POST", "/api/decode", None, {"Content-Length": "-5"}, 400),
    "superscript Content-Length": ("POST", "/api/decode", None, {"Content-Length": "\u00b2"}, 400),
    "Content-Length of 5,000 digits": ("POST", "/api/decode", None, {"Content-Length": "9" * 5000}, 413),
    # The body is never sent: a server that tried to read it before checking the size would hang here.
    "body over 1 MB": ("POST", "/api/digit", None, {"Content-Type": "application/json", "Content-Length": "1000001"}, 413),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_a_bad_request_gets_a_4xx_json_error_and_the_server_goes_on(server, name, capfd):
    method, path, payload, headers, expected = BAD_REQUESTS[name]
    status, answer = request(server, method, path, payload, json_headers(payload) if headers is None else headers)
    assert status == expected, answer
    assert list(answer) == ["error"] and answer["error"] and "\n" not in answer["error"]
    assert request(server, "GET", "/api/map")[0] == 200
    assert capfd.readouterr().err == ""  # no traceback, no log line


def test_a_malformed_request_line_gets_a_json_error(server):
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1 junk\r\n\r\n")
        reply = sock.makefile("rb").read()
    assert list(json.loads(reply.split(b"\r\n\r\n")[-1])) == ["error"]  # no status line: the request was not even HTTP/1.0
    assert request(server, "GET", "/api/map")[0] == 200


def test_the_page_is_served_without_outside_resources(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    conn.request("GET", "/")
    response = conn.getresponse()
    page = response.read().decode()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/html")
    assert "<canvas" in page and "touch-action: none" in page and "://" not in page  # no CDN, works offline


def test_concurrent_clients_get_the_same_answers_as_one_client(server):
    bodies = [body(drawing(points)) for points in STROKES]
    single = [post(server, "/api/digit", b) for b in bodies]
    assert all(status == 200 for status, _ in single) and len({a["score"] for _, a in single}) == len(bodies)
    results, errors = {}, []

    def client(i: int) -> None:
        try:
            for k in range(5):
                which = (i + k) % len(bodies)
                results[(i, k)] = (which, post(server, "/api/digit", bodies[which]))
        except Exception as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 40
    for which, answer in results.values():
        assert answer == single[which]


# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def checkpoint_file(model_and_reference, tmp_path_factory) -> Path:
    """The tiny model saved as a checkpoint that `python main.py demo --checkpoint` loads."""
    model, reference = model_and_reference
    config = train.TRAIN_DEFAULTS | {"precision": "fp32"} | checkpoint.config_dict(CONFIG)
    ckpt = {"format": checkpoint.FORMAT, "config": config, "model": model.state_dict(), "anomaly_reference": reference}
    path = tmp_path_factory.mktemp("demo") / "tiny.pt"
    torch.save(ckpt | {"checksum": checkpoint.checksum(ckpt)}, path)
    return path


def start_demo(*args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), "demo", "--device", "cpu", *map(str, args)], cwd=ROOT, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def test_ctrl_c_stops_the_server_in_one_line_and_a_busy_port_is_a_one_line_error(checkpoint_file):
    first = start_demo("--checkpoint", checkpoint_file, "--port", 0)
    try:
        line = first.stdout.readline()
        assert line.startswith("demo ready at http://127.0.0.1:") and "warning" not in line, line + first.stderr.read()
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        assert request(port, "GET", "/api/map")[0] == 200
        # A second server on the same port, on every interface: the warning, then one error line and exit 2.
        second = start_demo("--checkpoint", checkpoint_file, "--port", port, "--host", "0.0.0.0")
        out, err = second.communicate(timeout=60)
        assert second.returncode == 2, err
        assert out.startswith("warning: --host 0.0.0.0 is not a loopback address") and out.count("\n") == 1, out
        assert err.count("\n") == 1 and err.startswith("error: cannot serve on 0.0.0.0:") and "Traceback" not in err, err
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=30)
    finally:
        first.kill()
    assert first.returncode in (0, 130)
    assert (out + err).strip() == "demo stopped" and "Traceback" not in err, (out, err)


# ----------------------------------------------------------------------------- a real browser


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by selenium, with the system chromedriver: nothing is downloaded."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("no chromium or chromedriver found (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


def wait_for(driver, script: str, timeout: float = 20):
    """Poll a JavaScript expression until it is truthy; return its value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = driver.execute_script("return " + script)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {script}")


def test_drawing_in_a_browser_shows_the_score_of_the_python_api(server, app, browser, model_and_reference, monkeypatch):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.interaction import POINTER_PEN
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.by import By

    model, reference = model_and_reference
    # Count the page's drawing requests and how many are out at once; each takes 50 ms more, so that a page that
    # did not wait for its answer would have several out.
    calls, out, most, count_lock = [0], [0], [0], threading.Lock()
    real_digit = app.digit

    def slow_digit(gray):
        with count_lock:
            calls[0], out[0] = calls[0] + 1, out[0] + 1
            most[0] = max(most[0], out[0])
        time.sleep(0.05)
        try:
            return real_digit(gray)
        finally:
            with count_lock:
                out[0] -= 1

    monkeypatch.setattr(app, "digit", slow_digit)
    browser.get(f"http://127.0.0.1:{server}/")
    wait_for(browser, "document.querySelectorAll('#sliders input').length === 6")
    pad = browser.find_element(By.ID, "pad")
    # A 7 with the mouse (offsets from the canvas centre, in CSS pixels), then its bar with a pen.
    mouse = ActionChains(browser, duration=20).move_to_element_with_offset(pad, -70, -80).click_and_hold()
    for dx, dy in [(35, 0), (35, 0), (35, 0), (35, 0), (-20, 40), (-20, 40), (-20, 40), (-20, 40)]:
        mouse.move_by_offset(dx, dy)
    mouse.release().perform()
    pen = ActionBuilder(browser, mouse=PointerInput(POINTER_PEN, "pen"), duration=20)
    pen.pointer_action.move_to(pad, -10, 0).pointer_down()
    for dx in (-20, 0, 20, 40):
        pen.pointer_action.move_to(pad, dx, 0)
    pen.pointer_action.pointer_up()
    pen.perform()
    answer = wait_for(browser, "state.inFlight === 0 && state.answer")
    assert calls[0] >= 3 and most[0] == 1, (calls, most)  # live while drawing (not only on release), one at a time
    pixels = browser.execute_script("return drawingBody()")  # what the page sent last: the canvas has not changed since
    gray = torch.tensor(pixels["pixels"]).reshape(pixels["height"], pixels["width"])
    x = data.prepare_digit(gray)[None]
    torch.testing.assert_close(torch.tensor(answer["prepared"])[None, None], x, atol=1e-4, rtol=0)
    expected = anomaly.score(model, x, samples=10, seed=0, reference=reference).item()
    assert float(browser.find_element(By.ID, "score").text) == pytest.approx(expected, abs=0.0051)
    percentile = 100 * (reference["test_scores"] <= answer["score"]).double().mean().item()
    assert browser.find_element(By.ID, "percentile").text == f"{percentile:.1f}%"
    ink = "Array.from(document.getElementById('{}').getContext('2d').getImageData(0, 0, 28, 28).data).reduce((a, b) => a + b, 0)"
    assert browser.execute_script("return " + ink.format("prepared")) > 28 * 28 * 255  # drawn: more than the opaque alpha

    # Move a slider: the moved code is decoded and marked on the map.
    browser.execute_script("const s = document.querySelector('#sliders input'); s.value = 2; s.dispatchEvent(new Event('input'))")
    wait_for(browser, "state.inFlight === 0 && state.movedPoint")
    # Random samples: 16 small canvases.
    browser.find_element(By.ID, "sample").click()
    wait_for(browser, "document.querySelectorAll('#samples canvas').length === 16")
    assert browser.find_element(By.ID, "status").text == ""
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors
