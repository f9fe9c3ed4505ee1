"""demo.py and demo.html: answers as the Python API's, bad and foreign requests, 50 clients, a
headless Chromium as laptop and phone (skipped without it; DEMO_SCREENSHOTS=docs/images saves)."""

import base64
import concurrent.futures
import contextlib
import http.client
import json
import math
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_model

import anomaly
import checkpoint
import demo
import evaluate
import prepare
from benchmarks import drawings
from files import UserError

# pen strokes through 4 random points, as fractions of the drawing's side: 64 "digits"
STROKES = (torch.rand(64, 4, 2, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2).tolist()
JSON = "application/json"


def drawing(points) -> torch.Tensor:
    """A pen stroke through `points` as the demo's pad draws it, dark on white, at 56 x 56."""
    pad = drawings.draw([[(x * drawings.PAD, y * drawings.PAD) for x, y in points]])
    return torch.nn.functional.avg_pool2d(pad[None], drawings.PAD // 56)[0]


def grey(pixels, side: int = 28) -> dict:
    return {"width": side, "height": side, "pixels": pixels}


@pytest.fixture(scope="module")
def app() -> demo.Demo:
    """A tiny untrained model with a small anomaly reference, test scores and a latent map."""
    model = tiny_model()
    x = torch.stack([prepare.prepare_digit(drawing(points)) for points in STROKES])
    reference = anomaly.fit_reference(model, x[:40], x[40:], samples=2, local_steps=5)
    reference["test_scores"] = anomaly.score(model, x[40:], reference=reference).sort().values
    mu = anomaly.posterior_means(model, x)
    axes = torch.linalg.svd(mu - mu.mean(0)).Vh[:2].T
    space = {"mean": mu.mean(0), "axes": axes, "points": (mu - mu.mean(0)) @ axes}
    return demo.Demo(model, reference, space | {"labels": torch.arange(64) % 10})


@contextlib.contextmanager
def served(app: demo.Demo, host: str = "127.0.0.1"):
    """A demo server on a free port, serving from a thread of this process, stopped after."""
    with demo.make_server(app, host, 0) as srv:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        yield srv
        srv.shutdown()


@pytest.fixture(scope="module")
def server(app) -> int:
    with served(app) as srv:
        yield srv.server_address[1]


def request(port, method, path, payload=None, headers=(), host="127.0.0.1") -> tuple[int, dict]:
    """(status, JSON); a dict or list goes as JSON; `headers` override (a Host too), None drops."""
    if isinstance(payload, dict | list):
        payload = json.dumps(payload).encode()
    sent = {} if payload is None else {"Content-Type": JSON, "Content-Length": str(len(payload))}
    sent = {name: value for name, value in (sent | dict(headers)).items() if value is not None}
    with contextlib.closing(http.client.HTTPConnection(host, port, timeout=30)) as conn:
        conn.putrequest(method, path, skip_host="Host" in sent, skip_accept_encoding=True)
        for name, value in sent.items():
            conn.putheader(name, value)
        conn.endheaders(payload)
        response = conn.getresponse()
        return response.status, json.loads(response.read())


def assert_image(rows: list, expected: torch.Tensor) -> None:
    torch.testing.assert_close(torch.tensor(rows).view_as(expected), expected, atol=1e-4, rtol=0)


@torch.inference_mode()
def decoded(model, z: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(model.decode(z.reshape(-1, z.shape[-1])))


def test_the_digit_map_decode_and_samples_answer_as_the_python_api(server, app):
    """Answers, thresholds (90th, 99th percentile), sliders by KL, map moves and samples."""
    wordings = {  # two decimals (0.25, not 0.2); never -0.00; a percentile never rounded up
        (0.25, 45.5): "score 0.25, at least as high as 45.5% of test digits: typical",
        (-0.004, 89.96): "score 0.00, at least as high as 89.9% of test digits: typical",
        (3.1234, 90.0): "score 3.12, at least as high as 90.0% of test digits: unusual",
        (-0.54, 99.0): "score -0.54, at least as high as 99.0% of test digits: very unusual",
        (312.4, None): "score 312.40",
    }
    assert {key: anomaly.describe(*key) for key in wordings} == wordings
    model, reference, gray = app.model, app.reference, drawing(STROKES[0])
    status, answer = request(server, "POST", "/api/digit", grey(gray.flatten().tolist(), side=56))
    x = prepare.prepare_digit(gray)[None]
    assert status == 200 and answer["method"] == anomaly.DEFAULT_METHOD, answer
    assert_image(answer["prepared"], x)
    expected = anomaly.score(model, x, samples=10, seed=0, reference=reference).item()
    assert answer["score"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    percentile = 100 * (reference["test_scores"] <= answer["score"]).double().mean().item()
    verdict = ["typical", "unusual", "very unusual"][(percentile >= 90) + (percentile >= 99)]
    assert answer["percentile"] == pytest.approx(percentile) and answer["verdict"] == verdict
    assert answer["description"] == anomaly.describe(answer["score"], answer["percentile"])
    mu = anomaly.posterior_means(model, x)
    torch.testing.assert_close(torch.tensor(answer["z"]), mu[0])
    assert_image(answer["reconstruction"], decoded(model, mu))
    point = (mu[0] - app.map["mean"]) @ app.map["axes"]
    torch.testing.assert_close(torch.tensor(answer["point"]), point)
    status, info = request(server, "GET", "/api/map")
    ranked, n = reference["test_scores"], len(reference["test_scores"])
    assert status == 200 and info["verdict_percentiles"] == [90, 99] and info["test_digits"] == n
    low, high = info["thresholds"]
    kth = [ranked[math.ceil(p * n / 100) - 1].item() for p in (90, 99)]  # k = ceil(p n / 100)
    assert [low, high] == pytest.approx(kth)
    below = torch.nextafter(torch.tensor(low), torch.tensor(-math.inf)).item()
    verdicts = [anomaly.verdict(app.percentile(v)) for v in (below, low, high)]
    assert verdicts == ["typical", "unusual", "very unusual"]
    assert info["latent_dim"] == 8 and len(info["points"]) == len(info["labels"]) == 64
    assert "negative score is normal" in info["meaning"] and "separate the ten" in info["map_axes"]
    kl = torch.rand(8, generator=torch.Generator().manual_seed(5))
    axes = ("1 (left-right on the map)", "2 (up-down on the map)")
    ordinals = ("", "2nd ", "3rd ", "4th ")
    stored = demo.Demo(model, reference, app.map | {"kl_per_dim": kl})
    assert "estimated" in info["kl_measure"]
    assert stored.kl_measure == "mean KL per dimension on the test digits"
    for shown, top in ((info, app.kl), (stored.map_and_sliders(), kl)):
        names, dims = [s["name"] for s in shown["sliders"]], top.argsort(descending=True).tolist()
        ranked = [f"z{d} ({r}most-used: KL {top[d]:.2f} nats)" for d, r in zip(dims, ordinals)]
        assert names == [f"map axis {k}" for k in axes] + [f"latent {r}" for r in ranked]
    z = torch.linspace(-1, 1, 8)
    status, answer = request(server, "POST", "/api/decode", {"z": z.tolist()})
    assert status == 200 and answer["z"] == pytest.approx(z.tolist())
    assert_image(answer["image"], decoded(model, z))
    status, answer = request(server, "POST", "/api/decode", {"z": z.tolist(), "point": [1.5, -0.5]})
    assert status == 200 and answer["point"] == pytest.approx([1.5, -0.5], abs=1e-4)
    assert_image(answer["image"], decoded(model, torch.tensor(answer["z"])))
    status, samples = request(server, "GET", "/api/samples?n=16&seed=3")
    assert status == 200 and len(samples["images"]) == 16
    assert_image(samples["images"], model.sample(16, torch.Generator().manual_seed(3)))
    assert request(server, "GET", "/api/samples?n=16&seed=4")[1]["images"] != samples["images"]


def test_every_slider_changes_the_digit_even_where_the_map_lies_in_dims_the_decoder_ignores(app):
    """A map move (in dims with KL near 0, where a little leaks) moves only along it; z keeps it."""
    model = tiny_model()  # app.model's weights, to change
    with torch.no_grad():
        model.decoder[0].weight[:, 4:] = 0  # the decoder ignores z4..z7
    codes = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    codes[:, 4:] = 0.01 * codes[:, :4]
    axes = torch.zeros(8, 2)
    axes[4, 0] = axes[5, 1] = 100.0
    kl = torch.tensor([2.0, 1.5, 1.2, 1.0, 0, 0, 0, 0])
    space = {"mean": torch.zeros(8), "axes": axes, "points": codes @ axes, "kl_per_dim": kl}
    moving = demo.Demo(model, app.reference | {"codes": codes}, space | {"labels": codes[:, 0] > 0})
    spread, changes = (codes @ axes).std(0), []
    for k in range(2):  # a map axis: six spreads of the map along it, none across
        ends = [moving.move_to(torch.zeros(8), s * spread * torch.eye(2)[k]) for s in (-3, 3)]
        moved = moving.map_point(ends[1] - ends[0]) / spread
        assert moved[k].item() == pytest.approx(6, rel=1e-3) and abs(moved[1 - k].item()) < 1e-3
        changes.append((decoded(model, ends[1]) - decoded(model, ends[0])).abs().mean().item())
    for s in moving.map_and_sliders()["sliders"][2:]:
        step = s["scale"] * torch.eye(8)[s["dim"]]
        ends = [moving.move_to(v * step, torch.zeros(2)) for v in (-3, 3)]
        assert moving.map_point(ends[1]).abs().max() < 1e-4  # the ring stays
        changes.append((decoded(model, ends[1]) - decoded(model, ends[0])).abs().mean().item())
    assert min(changes) > 0.2 * max(changes), changes


@pytest.mark.parametrize("latent_dim,axes", [(8, [0, 1, None, None, None, None]), (1, [0, None])])
def test_without_reference_or_map_the_score_is_elbo_and_the_map_first_dims(app, latent_dim, axes):
    """No reference: elbo, no percentile; no map: the first latent dimensions (a 1-d code: one)."""
    model = app.model if latent_dim == 8 else tiny_model(latent_dim=1)
    bare, x = demo.Demo(model, None), prepare.prepare_digit(drawing(STROKES[1]))[None]
    answer = bare.digit(drawing(STROKES[1]))
    assert answer["method"] == "elbo" and answer["percentile"] is None and answer["verdict"] is None
    assert answer["score"] == pytest.approx(anomaly.score(model, x, "elbo").item(), rel=1e-5)
    assert answer["description"] == anomaly.describe(answer["score"], None)
    info = bare.map_and_sliders()
    assert info["points"] == [] and info["thresholds"] is None and "nats" in info["meaning"]
    assert [s.get("axis") for s in info["sliders"]] == axes
    assert answer["point"][:latent_dim] == pytest.approx(answer["z"][:2])
    moved = bare.decode(torch.tensor(answer["z"]), torch.tensor([0.5, -1.0]))["point"]
    assert moved == pytest.approx([0.5, -1.0][:latent_dim] + [0.0] * (2 - latent_dim), abs=1e-5)


def own(host: str, origin: str) -> dict:
    return {"Host": f"{host}:{{port}}", "Origin": origin}


DIGIT, DECODE, Z, P, G = "/api/digit", "/api/decode", {"z": [0.0] * 8}, "POST", "GET"
ZS = (b"1e999", b"9" * 400, b"1e30")  # overflowing to infinity, 400 digits, too large
QUERIES = ("n=1000", "seed=" + "9" * 5000, "n=%C2%B2")
LOOPBACK = ("LocalHost", "127.0.0.2", "[::1]")
SIZES = {"abc": 400, "\u00b2": 400, "9" * 5000: 413, "1000001": 413}
REQUESTS = {  # name: (method, path, body, headers (over a body's JSON ones), expected status)
    "malformed JSON": (P, DIGIT, b'{"width": 28,', {}, 400),
    "not an object": (P, DIGIT, b"[1, 2, 3]", {}, 400),
    "deeply nested": (P, DECODE, b"[" * 100_000, {}, 400),
    "wrong size": (P, DIGIT, grey([0.5] * 783), {}, 400),
    "huge width": (P, DIGIT, grey([], side=10**9), {}, 400),
    "pixel out of range": (P, DIGIT, grey([1.5] * 784), {}, 400),
    "true as pixels": (P, DIGIT, grey([True] * 784), {}, 400),  # True is 1 to torch.tensor
    "true in a map point": (P, DECODE, {"z": [0.0] * 8, "point": [True, 0]}, {}, 400),
    "NaN pixel": (P, DIGIT, b'{"width": 2, "height": 1, "pixels": [NaN, 0]}', {}, 400),
    **{f"z {v[:9]}": (P, DECODE, b'{"z": [%s, 0, 0, 0, 0, 0, 0, 0]}' % v, {}, 400) for v in ZS},
    "z of the wrong length": (P, DECODE, b'{"z": [0, 0, 0]}', {}, 400),
    "blank drawing": (P, DIGIT, grey([1.0] * 784), {}, 422),
    "drawing too small": (P, DIGIT, grey([0.5] * 16, side=4), {}, 422),
    "unknown path": (G, "/nope", None, {}, 404),
    "GET on a POST route": (G, DIGIT, None, {}, 405),
    "PUT": ("PUT", "/", b"{}", {}, 405),
    # a seed of 5,000 digits is refused by int(); %C2%B2, a superscript 2, is a digit to isdigit()
    **{f"samples {q[:12]}": (G, f"/api/samples?{q}", None, {}, 400) for q in QUERIES},
    "no Content-Length": (P, DECODE, None, {"Content-Type": JSON}, 411),
    # over 1 MB: the body is never sent, so a server reading it before the size check would hang
    **{f"length {n[:8]!r}": (P, DIGIT, b"", {"Content-Length": n}, s) for n, s in SIZES.items()},
    # what another site's page may post without asking this server first: forms and text
    "text/plain": (P, DECODE, Z, {"Content-Type": "text/plain"}, 415),
    "no Content-Type": (P, DECODE, Z, {"Content-Type": None}, 415),
    # DNS rebinding: another site's name, made to resolve to 127.0.0.1, arrives here as the Host
    "Host of another site:port": (P, DECODE, Z, {"Host": "evil.example:{port}"}, 421),
    "Host that is not one": (G, "/api/map", None, {"Host": "::1:{port}"}, 421),
    # the page at another of its names is another site
    "page of another name": (P, DECODE, Z, {"Origin": "http://localhost:{port}"}, 403),
    # any loopback name with the served port is this server, and its page may post
    **{f"Host {h}": (P, DECODE, Z, own(h, f"http://{h}:{{port}}"), 200) for h in LOOPBACK},
    "JSON; charset": (P, DECODE, Z, {"Content-Type": JSON + "; charset=utf-8"}, 200),
}


@pytest.mark.parametrize("name", REQUESTS)
def test_a_bad_request_gets_a_4xx_json_error_and_the_server_goes_on(server, name, capfd):
    """Every kind of bad or foreign request; and the server's own names and page, answered."""
    method, path, payload, headers, expected = REQUESTS[name]
    headers = {k: v and v.format(port=server) for k, v in headers.items()}
    status, answer = request(server, method, path, payload, headers)
    assert status == expected, answer
    if status != 200:  # one line of JSON, and the server goes on, logging nothing
        assert list(answer) == ["error"] and answer["error"] and "\n" not in answer["error"]
        assert request(server, "GET", "/api/map")[0] == 200 and capfd.readouterr().err == ""


def test_raw_http_a_trickling_client_and_fifty_clients_at_once(server, monkeypatch, capfd):
    """Offline page, HEAD, a non-HTTP line; 50 threads x 4 posts answered as one; a deadline."""

    def ask(line: str) -> tuple[bytes, bytes]:  # (status line and headers, body): read to the end
        with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
            sock.sendall(f"{line}\r\nHost: 127.0.0.1:{server}\r\n\r\n".encode())
            return sock.makefile("rb").read().rpartition(b"\r\n\r\n")[::2]

    for path in ("/api/map", "/"):
        (head, rest), (got, content) = ask(f"HEAD {path} HTTP/1.1"), ask(f"GET {path} HTTP/1.1")
        assert head.startswith(b"HTTP/1.0 200"), head
        assert f"Content-Length: {len(content)}".encode() in head
        assert rest == b"" and got.startswith(b"HTTP/1.0 200") and content, got
    # the page: no CDN, so it works offline
    assert b"Content-Type: text/html" in got and b"://" not in content
    assert b"<canvas" in content and b"touch-action: none" in content
    head, rest = ask("HEAD /api/digit HTTP/1.1")
    assert head.startswith(b"HTTP/1.0 405") and rest == b""
    assert list(json.loads(ask("GET / HTTP/1.1 junk")[1])) == ["error"]  # not HTTP: still JSON
    bodies = [grey(drawing(points).flatten().tolist(), side=56) for points in STROKES[:8]]
    released = threading.Barrier(50)
    single = [request(server, "POST", "/api/digit", b) for b in bodies]

    def client(i: int) -> list:
        released.wait(timeout=30)
        try:
            return [request(server, "POST", "/api/digit", bodies[(i + k) % 8]) for k in range(4)]
        except OSError as err:  # ConnectionResetError, BrokenPipeError, a timeout
            return [repr(err)]

    with concurrent.futures.ThreadPoolExecutor(50) as clients:
        answers = list(clients.map(client, range(50)))
    assert {status for status, _ in single} == {200} and len({a["score"] for _, a in single}) == 8
    assert answers == [[single[(i + k) % 8] for k in range(4)] for i in range(50)]
    # a byte every 0.1 s never trips the per-read timeout; the request's deadline frees the thread
    monkeypatch.setattr(demo.Handler, "deadline", 1.0)
    with socket.create_connection(("127.0.0.1", server), timeout=0.1) as sock:
        sock.sendall(f"POST /api/decode HTTP/1.1\r\nHost: 127.0.0.1:{server}\r\nX-Slow: ".encode())
        start, closed = time.monotonic(), False
        while not closed and time.monotonic() - start < 6:
            try:
                sock.sendall(b"a")
                closed = sock.recv(1024) == b""
            except OSError as err:  # a timeout: nothing yet; else reset by the server
                closed = not isinstance(err, TimeoutError)
        assert closed and time.monotonic() - start < 3
    assert request(server, "GET", "/api/map")[0] == 200 and capfd.readouterr().err == ""


HOSTS = """\
10.1.2.3:8000 10.1.2.3 10.1.2.3 True
demo.lan:8000 demo.lan 10.1.2.3 True
localhost:8000 10.1.2.3 10.1.2.3 False
evil.example:8000 demo.lan 10.1.2.3 False
10.1.2.3:8001 10.1.2.3 10.1.2.3 False
[fd00::5]:8000 fd00::5 fd00::5 True
anything.example:1234 0.0.0.0 0.0.0.0 True
localhost 127.0.0.1 127.0.0.1 False"""


def test_host_headers_an_unresolvable_host_and_the_ipv6_loopback(app):
    """Which Host headers are ours (no port: 80); a host we cannot serve on is named; IPv6 too."""
    rows = [row.split() for row in HOSTS.splitlines()]
    own_host = [demo.is_own_host(header, host, address, 8000) for header, host, address, _ in rows]
    assert own_host == [expected == "True" for *_, expected in rows], rows
    assert demo.exposure_warning("::1") is None
    for host, start, advice in (  # 192.0.2.1: an address of no machine here
        ("no-such-host.invalid", "--host no-such-host.invalid is unresolvable", "pass an address"),
        ("192.0.2.1", "cannot serve on 192.0.2.1:0", "pass --host"),
    ):
        with pytest.raises(UserError) as caught:
            demo.make_server(app, host, 0)
        said = str(caught.value)
        assert said.startswith(start) and advice in said and "--port" not in said, said
        assert "\n" not in said, said
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    with served(app, "::1") as srv:
        port = srv.server_address[1]
        assert request(port, "GET", "/api/map", host="::1")[0] == 200  # Host: [::1]:PORT
        assert demo.page_url(srv) == f"http://[::1]:{port}/"


@pytest.fixture(scope="module")
def chromium():
    """(headless Chromium driven by selenium with the system chromedriver: nothing downloaded, the
    Demo of the shipped model (an untrained one's digits hardly move) or DEMO_CHECKPOINT, port)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver", path="/usr/bin") or shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("no chromium or chromedriver found (apt-get install chromium chromium-driver)")
    options, service = webdriver.ChromeOptions(), webdriver.ChromeService(driver_path)
    options.binary_location = chromium
    for flag in ("headless=new", "no-sandbox", "disable-dev-shm-usage", "disable-gpu"):
        options.add_argument("--" + flag)
    options.add_argument("--disable-background-networking")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    model, ckpt = checkpoint.load_model(os.environ.get("DEMO_CHECKPOINT", checkpoint.SHIPPED))
    reference, space = anomaly.reference_of(ckpt), evaluate.latent_map_of(ckpt)
    page = demo.Demo(model, reference, space, ckpt["config"]["binarize"])
    with served(page) as srv, webdriver.Chrome(service=service, options=options) as driver:
        yield driver, page, srv.server_address[1]


def ev(driver, expression: str, *args):
    """A JavaScript expression's value on the page (arguments[i]: args[i])."""
    return driver.execute_script("return " + expression, *args)


def wait_for(driver, expression: str):
    """Poll a JavaScript expression until it is truthy (20 s at most); return its value."""
    from selenium.webdriver.support.wait import WebDriverWait

    return WebDriverWait(driver, 20, 0.05).until(lambda d: ev(d, expression), expression)


def stroke(driver, element_id: str, kind: str, points: list[tuple[int, int]]) -> None:
    """A mouse, pen or finger stroke through offsets (px) from an element's centre; one: a tap."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    builder = ActionBuilder(driver, mouse=PointerInput(kind, kind), duration=20)
    actions, element = builder.pointer_action, ev(driver, f"$('{element_id}')")
    actions.move_to(element, *points[0]).pointer_down()
    for x, y in points[1:]:
        actions.move_to(element, x, y)
    actions.pointer_up()
    builder.perform()


BOXES = """[...document.querySelectorAll('section, input, button, canvas')]
  .map(e => (r => [e.tagName, r.left, r.right, r.top, r.bottom])(e.getBoundingClientRect()))"""
PIXELS = "(c => [...c.getContext('2d').getImageData(0,0,c.width,c.height).data])($(arguments[0]))"
MAP_SLIDERS = "[...mapSliders()].map(s => Number(s.value))"
SET_SLIDER = "(s => { s.value = arguments[1]; s.dispatchEvent(new Event('input')); })(arguments[0])"
OFFSET_ON_MAP = """(c => { const r = c.getBoundingClientRect();  // an offset from the centre -> map
  return fromCanvas((r.width / 2 + arguments[0]) * c.width / r.width,
                    (r.height / 2 + arguments[1]) * c.height / r.height); })($('map'))"""
# the page's drawing requests and the most out at once, each held 50 ms: a page not waiting has more
COUNT_DIGIT_CALLS = """const real = window.fetch; Object.assign(window, {calls: 0, out: 0, most: 0})
window.fetch = async (path, options) => { if (path !== "/api/digit") return real(path, options);
  calls++; most = Math.max(most, ++out);
  try { await new Promise(done => setTimeout(done, 50)); return await real(path, options); }
  finally { out--; } };"""


def digit_pixels(driver, canvas: str) -> list[int]:
    """The grey levels of a 28x28 digit canvas (all 0 while it is blank)."""
    return ev(driver, PIXELS, canvas)[: 4 * 784 : 4]


def ring(driver, rgb: tuple[int, int, int]) -> tuple[int, list[float]]:
    """(pixels, centre) of the map's ring of a colour: black, the drawing; grey (136), the code."""
    rgba = ev(driver, PIXELS, "map")
    found = [i // 4 for i in range(0, len(rgba), 4) if rgba[i : i + 4] == [*rgb, 255]]
    n = max(1, len(found))
    return len(found), [sum(i % 300 for i in found) / n, sum(i // 300 for i in found) / n]


@pytest.mark.parametrize("width,height,pointer", [(390, 844, "touch"), (1200, 900, "mouse")])
def test_a_browser_draws_moves_every_control_and_clears(chromium, width, height, pointer):
    """Phone and laptop: layout, the API's answer in its words, each control, a wide view, Clear."""
    (browser, app, port), phone = chromium, pointer == "touch"
    size = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": phone}
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", size)
    browser.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": phone})
    browser.get(f"http://127.0.0.1:{port}/")
    wait_for(browser, "document.querySelectorAll('#sliders input').length === 6")
    browser.execute_script(COUNT_DIGIT_CALLS)
    seven = [(-70 + 35 * i, -80) for i in range(5)] + [(50 - 20 * i, 40 * i - 40) for i in range(4)]
    stroke(browser, "pad", pointer, seven)  # a 7: its top and stem, then its bar
    stroke(browser, "pad", "touch" if phone else "pen", [(-10 + 10 * i, 0) for i in range(6)])
    answer = wait_for(browser, "state.inFlight === 0 && state.answer")
    assert ev(browser, "[calls >= 3, most]") == [True, 1]  # live while drawing, one at a time
    assert ev(browser, "document.documentElement.scrollWidth") <= width, "it scrolls sideways"
    boxes = ev(browser, BOXES)
    assert all(0 <= left and right <= width for _, left, right, _, _ in boxes), boxes
    sections = [box for box in boxes if box[0] == "SECTION"]
    stacked = all(a[4] <= b[3] for a, b in zip(sections, sections[1:]))
    assert len(sections) == 5 and stacked == phone, sections
    # the page shows the API's answer (the Python API's own: the first test) in its words
    shown = ev(browser, "['description', 'meaning', 'thresholds'].map(i => $(i).textContent)")
    assert shown[0] == anomaly.describe(answer["score"], answer["percentile"])
    assert ev(browser, "$('description').className") == "big " + answer["verdict"].replace(" ", "-")
    assert "negative score is normal" in shown[1]
    assert all(f"{t:.2f}" in shown[2] for t in app.thresholds)
    assert sum(digit_pixels(browser, "prepared")) > 0 and ring(browser, (0, 0, 0))[0] > 0
    # the map sliders start at the drawing's place; every slider changes the digit
    assert ev(browser, MAP_SLIDERS) == pytest.approx(answer["point"], abs=1e-6)
    browser.find_element("id", "sample").click()
    for k, slider in enumerate(ev(browser, "[...document.querySelectorAll('#sliders input')]")):
        before = digit_pixels(browser, "moved")
        ev(browser, SET_SLIDER, slider, ev(browser, "arguments[0].max", slider) if k < 2 else 2.5)
        wait_for(browser, "state.inFlight === 0 && state.movedPoint")
        change = sum(abs(a - b) for a, b in zip(before, digit_pixels(browser, "moved"))) / 784
        assert change > 2, f"slider {k} hardly changed the digit: {change:.2f} grey levels"
    # one control: a click or tap moves the map sliders there, the code lands there, its grey ring
    # sits there; a z slider then starts from that place
    ev(browser, "$('map').scrollIntoView({block: 'center'})")
    stroke(browser, "map", pointer, [(60, -60)])
    wait_for(browser, "state.inFlight === 0 && state.movedPoint")
    values = ev(browser, MAP_SLIDERS)
    assert values == pytest.approx(ev(browser, OFFSET_ON_MAP, 60, -60), abs=0.02)
    assert ev(browser, "state.movedPoint") == pytest.approx(values, abs=1e-3)
    count, centre = ring(browser, (136, 136, 136))
    expected = ev(browser, "[toCanvas(arguments[0], 0), toCanvas(arguments[1], 1)]", *values)
    assert count > 10 and centre == pytest.approx(expected, abs=1.5), (centre, expected)
    ev(browser, SET_SLIDER, ev(browser, "dimSliders()[0]"), -2)
    wait_for(browser, "state.inFlight === 0 && $('samples').children.length === 16")
    assert ev(browser, "state.movedPoint") == pytest.approx(values, abs=1e-3)
    assert "-0.0" not in ev(browser, "document.body.innerText")
    if folder := os.environ.get("DEMO_SCREENSHOTS"):  # the whole page, however tall
        tall = ev(browser, "document.documentElement.scrollHeight")
        clip = {"x": 0, "y": 0, "width": width, "height": tall, "scale": 1}
        page = {"clip": clip, "captureBeyondViewport": True}
        shot = browser.execute_cdp_cmd("Page.captureScreenshot", page)
        Path(folder, f"demo{'_phone' * phone}.png").write_bytes(base64.b64decode(shot["data"]))
    # a drawing far off the map widens the view, says so, and the sliders span it
    note = ev(browser, "showDigit({...state.answer, point: [40, -40]}) || $('map-note').innerText")
    assert note.startswith("Zoomed out") and "(40.0, -40.0)" in note, note
    assert ev(browser, MAP_SLIDERS) == [40, -40]
    assert ev(browser, "showDigit(arguments[0]) || $('map-note').textContent", answer) == ""
    browser.find_element("id", "clear").click()
    assert ev(browser, "$('description').textContent + $('status').textContent") == "–"
    assert not any(any(digit_pixels(browser, c)) for c in ("prepared", "reconstruction", "moved"))
    assert ev(browser, "state.answer === null && state.movedPoint === null")
    assert ring(browser, (0, 0, 0))[0] == 0  # and the page logged no error:
    assert not [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
