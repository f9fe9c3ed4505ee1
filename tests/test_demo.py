"""The demo (demo.py, demo.html): its JSON answers against the Python API, every kind of bad or
foreign request over a real socket, many clients at once, the command line, and a real headless
Chromium that draws, moves every control and clears.

One small untrained model and one server serve the whole module; the browser test skips where no
Chromium, chromedriver or selenium is installed (`apt-get install chromium chromium-driver`, `pip
install selenium`). DEMO_CHECKPOINT=pretrained/vae-mnist.pt serves that checkpoint to the browser
instead, and DEMO_SCREENSHOT=FILE.png saves the page once a digit is drawn (docs/images/demo.png is
made so).
"""

from __future__ import annotations

import concurrent.futures
import copy
import http.client
import json
import math
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import resave, run_main, start_cli

import anomaly
import checkpoint
import demo
import evaluate
import prepare
from config import TrainConfig, VAEConfig
from files import UserError
from model import VAE

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
    """A pen stroke through `points`, dark ink on white as a canvas holds it, anti-aliased by
    distance to the stroke."""
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
def tiny():
    """A tiny untrained model with a small anomaly reference, test scores and a latent map, as
    training stores them."""
    torch.manual_seed(0)
    model = VAE(**asdict(CONFIG)).eval()
    gen = torch.Generator().manual_seed(0)
    strokes = [torch.rand(4, 2, generator=gen) * 0.6 + 0.2 for _ in range(64)]
    x = torch.stack([prepare.prepare_digit(drawing(points, 56)) for points in strokes])
    reference = anomaly.fit_reference(model, x[:40], x[40:], samples=2, local_steps=5)
    with torch.inference_mode():
        mu, _ = model.encode(x)
    mean = mu.mean(0)
    axes = torch.linalg.svd(mu - mean).Vh[:2].T
    space = {
        "mean": mean,
        "axes": axes,
        "points": (mu - mean) @ axes,
        "labels": torch.arange(64) % 10,
    }
    reference["test_scores"] = anomaly.score(model, x[40:], reference=reference).sort().values
    return SimpleNamespace(model=model, reference=reference, space=space)


@pytest.fixture(scope="module")
def app(tiny) -> demo.Demo:
    return demo.Demo(tiny.model, tiny.reference, tiny.space)


def serve_in_thread(app: demo.Demo, host: str = "127.0.0.1"):
    srv = demo.make_server(app, host, 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def server(app) -> int:
    """One demo server on a free port, serving from a thread of this process: its port."""
    srv = serve_in_thread(app)
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def request(
    port: int, method: str, path: str, payload=None, headers=None, host="127.0.0.1"
) -> tuple[int, dict]:
    """(status, JSON answer). Headers go exactly as given: no Content-Length is added, nor a Host if
    one is given."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.putrequest(
            method, path, skip_host="Host" in (headers or {}), skip_accept_encoding=True
        )
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders(payload)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def json_headers(payload: bytes, **more) -> dict:
    return {"Content-Type": "application/json", "Content-Length": str(len(payload))} | more


def post(port: int, path: str, obj, **headers) -> tuple[int, dict]:
    payload = json.dumps(obj).encode()
    return request(port, "POST", path, payload, json_headers(payload, **headers))


def exchange(port: int, raw: bytes) -> bytes:
    """Send raw bytes and read until the server closes the connection (it closes after every
    answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        return sock.makefile("rb").read()


def assert_image(rows: list, expected: torch.Tensor) -> None:
    torch.testing.assert_close(
        torch.tensor(rows).reshape(expected.shape), expected, atol=1e-4, rtol=0
    )


@torch.inference_mode()
def decoded(model: VAE, z: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(model.decode(z.reshape(-1, z.shape[-1])))


def test_digit_answer_matches_the_python_api(server, tiny):
    model, reference = tiny.model, tiny.reference
    gray = drawing(STROKES[0])
    status, answer = post(server, "/api/digit", body(gray))
    assert status == 200, answer
    x = prepare.prepare_digit(gray)[None]
    assert_image(answer["prepared"], x)
    expected = anomaly.score(model, x, samples=10, seed=0, reference=reference).item()
    assert answer["method"] == anomaly.DEFAULT_METHOD
    assert answer["score"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    percentile = 100 * (reference["test_scores"] <= answer["score"]).double().mean().item()
    assert answer["percentile"] == pytest.approx(percentile)
    assert answer["verdict"] == (
        "typical" if percentile < 90 else "unusual" if percentile < 99 else "very unusual"
    )
    with torch.inference_mode():
        mu, _ = model.encode(x)
    torch.testing.assert_close(torch.tensor(answer["z"]), mu[0])
    assert_image(answer["reconstruction"], decoded(model, mu))
    torch.testing.assert_close(
        torch.tensor(answer["point"]), (mu[0] - tiny.space["mean"]) @ tiny.space["axes"]
    )


def test_the_map_its_verdict_thresholds_sliders_decode_and_samples(server, tiny, app):
    """Thresholds at the 90th and 99th percentile of the test scores: a score reaching one is as
    high as that many. A code decodes as the Python API does, and a click on the map decodes the
    mean of the nearest training codes."""
    status, info = request(server, "GET", "/api/map")
    ranked, n = tiny.reference["test_scores"], len(tiny.reference["test_scores"])
    assert status == 200 and info["verdict_percentiles"] == [90, 99] and info["test_digits"] == n
    assert info["thresholds"] == pytest.approx(
        [ranked[math.ceil(p * n / 100) - 1].item() for p in (90, 99)]
    )
    low, high = info["thresholds"]
    below = torch.nextafter(torch.tensor(low), torch.tensor(-math.inf)).item()
    assert app.percentile(below) < 90 <= app.percentile(low) and app.percentile(high) >= 99
    assert [app.verdict(v) for v in (below, low, high)] == ["typical", "unusual", "very unusual"]
    assert info["latent_dim"] == 8 and len(info["points"]) == len(info["labels"]) == 64
    names, most = (
        [d["name"] for d in info["directions"]],
        tiny.reference["codes"].var(0).argsort(descending=True),
    )
    ranks = ["the most-used", "the 2nd most-used", "the 3rd most-used", "the 4th most-used"]
    assert names == ["map axis 1 (left-right on the map)", "map axis 2 (up-down on the map)"] + [
        f"latent z{d} ({rank} dimension)" for d, rank in zip(most.tolist(), ranks)
    ]
    assert "separate the ten digits" in info["map_axes"]
    for d in info["directions"]:
        assert len(d["vector"]) == 8 and torch.tensor(d["vector"]).norm().item() == pytest.approx(
            1, abs=1e-5
        )
        assert d["scale"] > 0
    z = torch.linspace(-1, 1, 8)
    status, answer = post(server, "/api/decode", {"z": z.tolist()})
    assert status == 200 and answer["z"] == pytest.approx(z.tolist())
    assert_image(answer["image"], decoded(tiny.model, z))
    codes, space = tiny.reference["codes"], tiny.space
    where = (codes - space["mean"]) @ space["axes"]
    point = where[:3].mean(0)
    status, answer = post(server, "/api/decode", {"point": point.tolist()})
    code = codes[(where - point).norm(dim=1).argsort()[: demo.NEAREST]].mean(0)
    assert status == 200, answer
    torch.testing.assert_close(torch.tensor(answer["z"]), code)
    assert_image(answer["image"], decoded(tiny.model, code))
    status, samples = request(server, "GET", "/api/samples?n=16&seed=3")
    assert status == 200 and len(samples["images"]) == 16
    assert_image(samples["images"], tiny.model.sample(16, torch.Generator().manual_seed(3)))
    assert request(server, "GET", "/api/samples?n=16&seed=4")[1]["images"] != samples["images"]


def test_every_slider_changes_the_digit_even_where_the_map_lies_in_dimensions_the_decoder_ignores(
    tiny,
):
    """As in the shipped model, whose map axes (a discriminant over all 32 dimensions) lie in
    near-constant dimensions the decoder ignores, where the encoder leaks a little of what the used
    ones hold: the map's sliders must still change the digit, and move the ring along their own axis
    only."""
    model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        model.decoder[0].weight[:, 4:] = 0  # the decoder ignores z4..z7
    codes = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    codes[:, 4:] = 0.01 * codes[:, :4]
    axes = torch.zeros(8, 2)
    axes[4, 0] = axes[5, 1] = 100.0
    space = {
        "mean": torch.zeros(8),
        "axes": axes,
        "points": codes @ axes,
        "labels": torch.arange(300) % 10,
    }
    app = demo.Demo(model, tiny.reference | {"codes": codes}, space)
    changes = []
    for k, d in enumerate(app.map_and_sliders()["directions"]):
        step = d["scale"] * torch.tensor(d["vector"])
        changes.append((decoded(model, 3 * step) - decoded(model, -3 * step)).abs().mean().item())
        if k < 2:  # a map axis: six spreads of the map along it, none across
            moved = app.map_point(6 * step) / (codes @ axes).std(0)
            assert moved[k].item() == pytest.approx(6, rel=1e-3) and abs(moved[1 - k].item()) < 1e-3
    assert min(changes) > 0.2 * max(changes), changes


def test_a_checkpoint_without_a_reference_is_scored_by_elbo_with_no_percentile(tiny):
    bare = demo.Demo(tiny.model, None)
    answer = bare.digit(drawing(STROKES[1]))
    x = prepare.prepare_digit(drawing(STROKES[1]))[None]
    assert answer["method"] == "elbo" and answer["percentile"] is None and answer["verdict"] is None
    assert answer["score"] == pytest.approx(
        anomaly.score(tiny.model, x, "elbo", samples=10, seed=0).item(), rel=1e-5
    )
    info = bare.map_and_sliders()
    assert (
        info["points"] == []
        and [d["scale"] for d in info["directions"]] == [1.0] * 6
        and info["thresholds"] is None
    )
    # the map falls back to the first two latent dimensions
    assert answer["point"] == pytest.approx(answer["z"][:2])
    assert bare.decode(bare.code_at(torch.tensor([0.5, -1.0])))["point"] == pytest.approx(
        [0.5, -1.0]
    )


def js(obj) -> bytes:
    return json.dumps(obj).encode()


def grey(pixels, side: int = 28) -> bytes:
    return js({"width": side, "height": side, "pixels": pixels})


DIGIT, DECODE, Z = "/api/digit", "/api/decode", js({"z": [0.0] * 8})
QUERIES, SIZES = (
    ("n=0", "n=1000", "n=abc", "seed=-1", "seed=" + "9" * 5000, "n=%C2%B2"),
    ("abc", "-5", "\u00b2"),
)
BAD_REQUESTS = {  # name: (method, path, body, headers or None for JSON ones, expected status)
    "malformed JSON": ("POST", DIGIT, b'{"width": 28,', None, 400),
    "not an object": ("POST", DIGIT, b"[1, 2, 3]", None, 400),
    "not UTF-8": ("POST", DIGIT, b'{"z": "\xff\xfe"}', None, 400),
    "deeply nested": ("POST", DECODE, b"[" * 100_000, None, 400),
    "wrong size": ("POST", DIGIT, grey([0.5] * 783), None, 400),
    "2-D pixels": ("POST", DIGIT, grey([[0, 1], [1, 0]], side=2), None, 400),
    "width not a number": (
        "POST",
        DIGIT,
        js({"width": "28", "height": 28, "pixels": [0] * 784}),
        None,
        400,
    ),
    "huge width": ("POST", DIGIT, grey([], side=10**9), None, 400),
    "pixel out of range": ("POST", DIGIT, grey([1.5] * 784), None, 400),
    "pixel not a number": ("POST", DIGIT, grey(["a"] * 784), None, 400),
    # true and false are 1 and 0 to torch.tensor
    "true as pixels": ("POST", DIGIT, grey([True] * 784), None, 400),
    "false in z": ("POST", DECODE, js({"z": [False] + [0.0] * 7}), None, 400),
    "true in a map point": ("POST", DECODE, js({"point": [True, 0]}), None, 400),
    "map point far off": ("POST", DECODE, js({"point": [1e6, 0]}), None, 400),
    "NaN pixel": ("POST", DIGIT, b'{"width": 2, "height": 1, "pixels": [NaN, 0]}', None, 400),
    "Infinity in z": ("POST", DECODE, b'{"z": [Infinity, 0, 0, 0, 0, 0, 0, 0]}', None, 400),
    "overflowing z": ("POST", DECODE, b'{"z": [1e999, 0, 0, 0, 0, 0, 0, 0]}', None, 400),
    "huge integer in z": (
        "POST",
        DECODE,
        b'{"z": [' + b"9" * 400 + b", 0, 0, 0, 0, 0, 0, 0]}",
        None,
        400,
    ),
    "z far too large": ("POST", DECODE, b'{"z": [1e30, 0, 0, 0, 0, 0, 0, 0]}', None, 400),
    "z of the wrong length": ("POST", DECODE, b'{"z": [0, 0, 0]}', None, 400),
    "z missing": ("POST", DECODE, b'{"code": [0, 0, 0, 0, 0, 0, 0, 0]}', None, 400),
    "blank drawing": ("POST", DIGIT, grey([1.0] * 784), None, 422),
    "drawing too small": ("POST", DIGIT, grey([0.5] * 16, side=4), None, 422),
    "unknown path": ("GET", "/nope", None, {}, 404),
    "unknown API path": ("POST", "/api/nope", b"{}", None, 404),
    "GET on a POST route": ("GET", DIGIT, None, {}, 405),
    "POST on a GET route": ("POST", "/api/map", b"{}", None, 405),
    "PUT": ("PUT", "/", b"{}", None, 405),
    "DELETE": ("DELETE", DECODE, None, {}, 405),
    # a seed of 5,000 digits is refused by int(); n=%C2%B2, a superscript 2, is a digit to
    # isdigit(), not to int()
    **{f"samples {q[:12]}": ("GET", f"/api/samples?{q}", None, {}, 400) for q in QUERIES},
    "no Content-Length": ("POST", DECODE, None, {"Content-Type": "application/json"}, 411),
    **{
        f"Content-Length {n!r}": (
            "POST",
            DECODE,
            None,
            json_headers(b"", **{"Content-Length": n}),
            400,
        )
        for n in SIZES
    },
    "Content-Length of 5,000 digits": (
        "POST",
        DECODE,
        None,
        json_headers(b"", **{"Content-Length": "9" * 5000}),
        413,
    ),
    # The body is never sent: a server that tried to read it before checking the size would hang
    # here.
    "body over 1 MB": (
        "POST",
        DIGIT,
        None,
        json_headers(b"", **{"Content-Length": "1000001"}),
        413,
    ),
    # What another site's page may post without asking this server first: forms and text are
    # refused.
    "text/plain body": ("POST", DECODE, Z, json_headers(Z, **{"Content-Type": "text/plain"}), 415),
    "form body": (
        "POST",
        DECODE,
        Z,
        json_headers(Z, **{"Content-Type": "application/x-www-form-urlencoded"}),
        415,
    ),
    "multipart body": (
        "POST",
        DECODE,
        Z,
        json_headers(Z, **{"Content-Type": "multipart/form-data; boundary=x"}),
        415,
    ),
    "no Content-Type": ("POST", DECODE, Z, {"Content-Length": str(len(Z))}, 415),
    "another site's page": ("POST", DECODE, Z, json_headers(Z, Origin="http://evil.example"), 403),
    "a sandboxed page": ("POST", DECODE, Z, json_headers(Z, Origin="null"), 403),
    "another site's GET": ("GET", "/api/samples?n=1", None, {"Origin": "http://evil.example"}, 403),
    # DNS rebinding: another site's name, made to resolve to 127.0.0.1, arrives here as the Host.
    "Host of another site": ("GET", "/api/map", None, {"Host": "evil.example"}, 421),
    "Host of another site, our port": (
        "POST",
        DECODE,
        Z,
        json_headers(Z, Host="evil.example:{port}"),
        421,
    ),
    "Host on another port": ("GET", "/", None, {"Host": "127.0.0.1:{other}"}, 421),
    "Host that is not one": ("GET", "/api/map", None, {"Host": "::1:{port}"}, 421),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_a_bad_request_gets_a_4xx_json_error_and_the_server_goes_on(server, name, capfd):
    method, path, payload, headers, expected = BAD_REQUESTS[name]
    headers = json_headers(payload) if headers is None else headers
    headers = {k: v.format(port=server, other=server + 1) for k, v in headers.items()}
    status, answer = request(server, method, path, payload, headers)
    assert status == expected, answer
    assert list(answer) == ["error"] and answer["error"] and "\n" not in answer["error"]
    assert request(server, "GET", "/api/map")[0] == 200
    assert capfd.readouterr().err == ""  # no traceback, no log line


def test_the_servers_own_names_and_page_are_answered(server):
    """Any loopback name with the served port is this server; a POST from its own page (Origin:
    http://Host) too."""
    for host in ("localhost", "LocalHost", "127.0.0.1", "127.0.0.2", "[::1]"):
        headers = json_headers(Z, Host=f"{host}:{server}", Origin=f"http://{host}:{server}")
        assert request(server, "POST", "/api/decode", Z, headers)[0] == 200, host
    charset = json_headers(Z, **{"Content-Type": "application/json; charset=utf-8"})
    assert request(server, "POST", "/api/decode", Z, charset)[0] == 200
    # Origin must be the Host the request went to: a page of localhost:PORT posting to
    # 127.0.0.1:PORT is another site.
    mixed = json_headers(Z, Host=f"127.0.0.1:{server}", Origin=f"http://localhost:{server}")
    assert request(server, "POST", "/api/decode", Z, mixed)[0] == 403


HOSTS = """\
10.1.2.3:8000 10.1.2.3 10.1.2.3 True
demo.lan:8000 demo.lan 10.1.2.3 True
localhost:8000 10.1.2.3 10.1.2.3 False
evil.example:8000 demo.lan 10.1.2.3 False
10.1.2.3:8001 10.1.2.3 10.1.2.3 False
[fd00::5]:8000 fd00::5 fd00::5 True
anything.example:1234 0.0.0.0 0.0.0.0 True
anything.example :: :: True
# Host header, --host, the address served on, whether it names this server
localhost 127.0.0.1 127.0.0.1 False"""


@pytest.mark.parametrize(
    "header,host,address,expected", [line.split() for line in HOSTS.splitlines()]
)
def test_which_host_headers_name_the_server(header, host, address, expected):
    """One address: that address with the port, or --host as given; every address (0.0.0.0, ::): any
    name, Origin still applies; no port: 80, not 8000."""
    assert demo.is_own_host(header, host, address, 8000) is (expected == "True")


def test_the_page_needs_nothing_outside_head_answers_as_get_without_a_body_and_a_bad_request_line_gets_json(
    server,
):
    def ask(method: str, path: str) -> tuple[bytes, bytes]:  # (status line and headers, body)
        raw = exchange(
            server, f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{server}\r\n\r\n".encode()
        )
        assert b"\r\n\r\n" in raw, raw
        return raw.partition(b"\r\n\r\n")[::2]

    for path in ("/", "/api/map"):
        (head, rest), (got, content) = ask("HEAD", path), ask("GET", path)
        assert (
            head.startswith(b"HTTP/1.0 200")
            and f"Content-Length: {len(content)}".encode() in head
            and content
        ), head
        assert rest == b"" and got.startswith(b"HTTP/1.0 200")
        if path == "/":  # the page: no CDN, so it works offline
            assert (
                b"Content-Type: text/html" in got
                and b"<canvas" in content
                and b"touch-action: none" in content
            )
            assert b"://" not in content
    head, rest = ask("HEAD", "/api/digit")
    assert head.startswith(b"HTTP/1.0 405") and rest == b""
    # a request line that is not HTTP: still JSON
    reply = exchange(server, b"GET / HTTP/1.1 junk\r\n\r\n")
    # no status line: not even HTTP/1.0
    assert list(json.loads(reply.split(b"\r\n\r\n")[-1])) == ["error"]
    assert request(server, "GET", "/api/map")[0] == 200


def test_a_client_trickling_its_request_is_cut_off_at_the_deadline(server, monkeypatch, capfd):
    """A byte every 0.1 s never trips the per-read timeout; the whole request's deadline still frees
    the thread."""
    monkeypatch.setattr(demo.Handler, "deadline", 1.0)
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        sock.sendall(f"POST /api/decode HTTP/1.1\r\nHost: 127.0.0.1:{server}\r\nX-Slow: ".encode())
        start, closed = time.monotonic(), False
        while not closed and time.monotonic() - start < 6:
            try:
                sock.sendall(b"a")
                sock.settimeout(0.1)
                closed = sock.recv(1024) == b""
            except TimeoutError:
                continue
            except OSError:  # reset by the server
                closed = True
        assert closed and time.monotonic() - start < 3
    # no traceback either
    assert request(server, "GET", "/api/map")[0] == 200 and capfd.readouterr().err == ""


def test_concurrent_clients_get_the_same_answers_as_one_client(server):
    bodies = [body(drawing(points)) for points in STROKES]
    single = [post(server, "/api/digit", b) for b in bodies]
    assert all(status == 200 for status, _ in single) and len(
        {a["score"] for _, a in single}
    ) == len(bodies)
    # 40 requests, 8 at a time; an error is raised here
    with concurrent.futures.ThreadPoolExecutor(8) as clients:
        answers = list(
            clients.map(lambda i: post(server, "/api/digit", bodies[i % len(bodies)]), range(40))
        )
    assert answers == [single[i % len(bodies)] for i in range(40)]


# ----------------------------------------------------------------------------- addresses and the
# command line


def test_the_ipv6_loopback_serves_and_an_unresolvable_host_is_named(app):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    srv = serve_in_thread(app, "::1")
    try:
        # Host: [::1]:PORT
        assert request(srv.server_address[1], "GET", "/api/map", host="::1")[0] == 200
        assert (
            demo.page_url(srv) == f"http://[::1]:{srv.server_address[1]}/"
            and demo.exposure_warning("::1") is None
        )
    finally:
        srv.shutdown()
        srv.server_close()
    expected = {"no-such-host.invalid": ["--host no-such-host.invalid is unresolvable"]}
    # an address of no machine here
    expected["192.0.2.1"] = ["cannot serve on 192.0.2.1:0", "pass --host"]
    for host, words in expected.items():
        with pytest.raises(UserError) as caught:
            demo.make_server(app, host, 0)
        message = str(caught.value)
        assert (
            "\n" not in message and "--port" not in message and all(w in message for w in words)
        ), message


@pytest.fixture(scope="module")
def checkpoint_file(tiny, tmp_path_factory) -> Path:
    """The tiny model saved as a checkpoint that `python main.py demo --checkpoint` loads."""
    config = checkpoint.config_dict(TrainConfig(precision="fp32"), CONFIG)
    ckpt = {"format": checkpoint.FORMAT, "config": config, "model": tiny.model.state_dict()}
    path = tmp_path_factory.mktemp("demo") / "tiny.pt"
    resave(ckpt | {"anomaly_reference": tiny.reference, "latent_map": tiny.space}, path)
    return path


def test_ctrl_c_stops_the_server_in_one_line_and_a_busy_port_is_a_one_line_error(checkpoint_file):
    """The server runs as a user runs it; a second one on its port, on every interface, runs in
    process."""
    use = ["demo", "--device", "cpu", "--checkpoint", checkpoint_file]
    first = start_cli(use + ["--port", 0], env={"OMP_NUM_THREADS": "1"})
    try:
        using, line = first.stdout.readline(), first.stdout.readline()
        assert using.startswith(f"using {checkpoint_file}: a model with no training history"), using
        assert line.startswith("demo ready at http://127.0.0.1:") and "warning" not in line, (
            line + first.stderr.read()
        )
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        assert request(port, "GET", "/api/map")[0] == 200
        # A second server on the same port, on every interface: the warning, then one error line and
        # exit 2.
        code, out, err = run_main(use + ["--port", port, "--host", "0.0.0.0"])
        assert code == 2 and out.count("\n") == 2, out + err
        assert out.splitlines()[1].startswith(
            "warning: --host 0.0.0.0 is not a loopback address"
        ), out
        assert (
            err.count("\n") == 1
            and err.startswith("error: cannot serve on 0.0.0.0:")
            and "--port" in err
        ), err
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
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
    )
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = (
        "/usr/bin/chromedriver"
        if os.path.exists("/usr/bin/chromedriver")
        else shutil.which("chromedriver")
    )
    if not chromium or not driver_path:
        pytest.skip("no chromium or chromedriver found (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(
        service=webdriver.ChromeService(executable_path=driver_path), options=options
    )
    # the page's size, not the window's
    size = {"width": 1200, "height": 900, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", size)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page():
    """(Demo, port) of the page's server: the shipped model (an untrained one's digits hardly change
    when its code moves), or the checkpoint DEMO_CHECKPOINT names."""
    model, ckpt = checkpoint.load_model(os.environ.get("DEMO_CHECKPOINT", checkpoint.SHIPPED))
    shown = demo.Demo(
        model, anomaly.reference_of(ckpt), evaluate.latent_map_of(ckpt), ckpt["config"]["binarize"]
    )
    srv = serve_in_thread(shown)
    yield shown, srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def wait_for(driver, script: str, timeout: float = 20):
    """Poll a JavaScript expression until it is truthy; return its value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = driver.execute_script("return " + script)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {script}")


PIXELS = (
    # a canvas's RGBA bytes: all 0 while it is blank
    "const c = document.getElementById(arguments[0]);"
    "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)"
)
# Wraps the page's fetch: counts its drawing requests and the most out at once, each held 50 ms
# longer, so that a page that did not wait for its answer would have several out.
COUNT_DIGIT_CALLS = """const real = window.fetch; Object.assign(window, {calls: 0, out: 0, most: 0});
window.fetch = async (path, options) => {
  if (path !== "/api/digit") return real(path, options);
  calls++; most = Math.max(most, ++out);
  try { await new Promise(done => setTimeout(done, 50)); return await real(path, options); } finally { out--; }
};"""


def grey_change(before: list[int], after: list[int]) -> float:
    """Mean change of a digit canvas's grey levels (0-255)."""
    return sum(abs(a - b) for a, b in zip(before[::4], after[::4])) / (len(before) // 4)


def black_pixels(driver) -> int:
    """Opaque black pixels of the map: only the ring marking the drawn digit is black."""
    rgba = driver.execute_script(PIXELS, "map")
    return sum(rgba[i : i + 4] == [0, 0, 0, 255] for i in range(0, len(rgba), 4))


def test_a_browser_draws_moves_every_control_and_clears(page, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.interaction import POINTER_PEN
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.by import By

    app, port = page
    browser.get(f"http://127.0.0.1:{port}/")
    wait_for(browser, "document.querySelectorAll('#sliders input').length === 6")
    browser.execute_script(COUNT_DIGIT_CALLS)
    # A 7: its top and stem with the mouse (offsets from the pad's centre, in CSS pixels), its bar
    # with a pen.
    pad = browser.find_element(By.ID, "pad")
    mouse = (
        ActionChains(browser, duration=20)
        .move_to_element_with_offset(pad, -70, -80)
        .click_and_hold()
    )
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
    calls = browser.execute_script("return [calls, most]")
    # live while drawing (not only on release), one at a time
    assert calls[0] >= 3 and calls[1] == 1, calls
    # The page shows what the Python API answers for the drawing the page sent last (the canvas has
    # not changed).
    text = {
        i: browser.find_element(By.ID, i).text
        for i in ("score", "percentile", "verdict", "thresholds")
    }
    sent = browser.execute_script("return drawingBody()")
    x = prepare.prepare_digit(torch.tensor(sent["pixels"]).reshape(sent["height"], sent["width"]))[
        None
    ]
    assert_image(answer["prepared"], x)
    expected = anomaly.score(app.model, x, samples=10, seed=0, reference=app.reference).item()
    assert float(text["score"]) == pytest.approx(expected, abs=0.0051) and text[
        "verdict"
    ] == app.verdict(expected)
    assert text["percentile"] == f"{app.percentile(answer['score']):.1f}%"
    assert (
        f"{app.thresholds[0]:.2f}" in text["thresholds"]
        and f"{app.thresholds[1]:.2f}" in text["thresholds"]
    )
    # and its ring
    assert (
        sum(browser.execute_script(PIXELS, "prepared")) > 28 * 28 * 255
        and black_pixels(browser) > 0
    )
    # Every slider, then a click on the map, must visibly change the decoded digit: the page's own
    # POSTs pass the Host, Origin and Content-Type checks.
    for k in range(6):
        before = browser.execute_script(PIXELS, "moved")
        slider = f"document.querySelectorAll('#sliders input')[{k}]"
        browser.execute_script(f"{slider}.value = 2.5; {slider}.dispatchEvent(new Event('input'))")
        wait_for(browser, "state.inFlight === 0 && state.movedPoint")
        change = grey_change(before, browser.execute_script(PIXELS, "moved"))
        assert change > 2, (
            f"slider {k} hardly changed the digit: {change:.2f} grey levels on average"
        )
    before, code = (
        browser.execute_script(PIXELS, "moved"),
        browser.execute_script("return state.code"),
    )
    ActionChains(browser).move_to_element_with_offset(
        browser.find_element(By.ID, "map"), 60, -60
    ).click().perform()
    wait_for(browser, "state.inFlight === 0")
    assert grey_change(before, browser.execute_script(PIXELS, "moved")) > 2
    assert browser.execute_script("return state.code") != code
    browser.find_element(By.ID, "sample").click()
    wait_for(browser, "document.querySelectorAll('#samples canvas').length === 16")
    if os.environ.get("DEMO_SCREENSHOT"):
        browser.save_screenshot(os.environ["DEMO_SCREENSHOT"])

    browser.find_element(By.ID, "clear").click()
    assert [browser.find_element(By.ID, i).text for i in ("score", "percentile", "verdict")] == [
        "–"
    ] * 3
    assert not any(
        any(browser.execute_script(PIXELS, c)) for c in ("prepared", "reconstruction", "moved")
    )
    assert browser.execute_script("return state.answer === null && state.movedPoint === null")
    assert black_pixels(browser) == 0  # the ring is gone
    assert browser.find_element(By.ID, "status").text == ""
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors
