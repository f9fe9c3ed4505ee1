"""python main.py demo: a page on which you draw a digit and watch the VAE answer.

The page (demo.html: HTML and JavaScript, nothing from the internet) sends the drawing's grey values here; the
server (the standard library's http.server) prepares them as `reconstruct` does, encodes, decodes and scores them:

    GET  /                 the page
    GET  /api/map          the latent-space map (reference points and digit labels) and the slider directions
    POST /api/digit        {"width": W, "height": H, "pixels": [W*H grey values in [0, 1], row by row]}
                           -> the prepared 28x28, its reconstruction, code z, map point, score and percentile
    POST /api/decode       {"z": [latent_dim numbers]} -> the decoded 28x28 and its map point
    GET  /api/samples?n=16 n digits decoded from z ~ N(0, I) (optional &seed=S)

Images travel as 28x28 lists of intensities in [0, 1]. A bad request gets a 4xx answer {"error": "..."}.
"""

from __future__ import annotations

import ipaddress
import json
import random
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import torch

import anomaly
import prepare
from files import UserError
from model import VAE

PAGE = Path(__file__).resolve().parent / "demo.html"
MAX_BODY = 1_000_000  # bytes; a 280x280 drawing with 2-3 decimals per value is about 200 kB
MAX_SIDE = 1000  # pixels per side of a drawing
SAMPLES, SEED = 10, 0  # z samples and seed of the score: `python main.py reconstruct`'s defaults, so percentiles agree
SLIDER_DIMS = 4  # latent dimensions offered as sliders, besides the two map axes


class BadRequest(Exception):
    """A request the server cannot answer: becomes an HTTP 4xx with a one-line JSON error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Demo:
    """The model and what the page needs from it. Every model call holds the lock: torch modules are not promised
    to be thread-safe, and the server answers each request on its own thread."""

    def __init__(self, model: VAE, reference: dict | None, latent_map: dict | None = None, binarize: bool = False):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.reference = reference
        self.binarize = binarize
        self.method = anomaly.DEFAULT_METHOD if reference is not None else "elbo"  # the others need the reference
        self.lock = threading.Lock()
        self.map = map_or_axes(latent_map, model.config.latent_dim)

    def map_point(self, z: torch.Tensor) -> list[float]:
        return ((z.cpu() - self.map["mean"]) @ self.map["axes"]).tolist()

    def digit(self, gray: torch.Tensor) -> dict:
        """Prepare a drawing (H, W) as MNIST was made, then reconstruct and score it."""
        try:
            x = prepare.prepare_digit(gray)[None].to(self.device)
        except prepare.ImageError as err:  # a blank drawing, say
            raise BadRequest(422, str(err)) from None
        if self.binarize:  # a model trained on binarized digits is scored on a binarized image, as reconstruct does
            x = torch.bernoulli(x, generator=torch.Generator(device=self.device).manual_seed(SEED))
        with self.lock, torch.inference_mode():
            mu, _ = self.model.encode(x)
            reconstruction = torch.sigmoid(self.model.decode(mu))
            value = anomaly.score(
                self.model, x, method=self.method, samples=SAMPLES, seed=SEED, reference=self.reference
            ).item()
        return {
            "prepared": image_list(x),
            "reconstruction": image_list(reconstruction),
            "z": mu[0].tolist(),
            "point": self.map_point(mu[0]),
            "score": value,
            "percentile": self.percentile(value),
            "method": self.method,
        }

    def percentile(self, value: float) -> float | None:
        """Percent of test digits scoring at most `value`; None when the checkpoint holds no test scores."""
        if self.method != anomaly.DEFAULT_METHOD or self.reference.get("test_scores") is None:
            return None
        return anomaly.percentile(self.reference["test_scores"], value)

    def decode(self, z: torch.Tensor) -> dict:
        with self.lock, torch.inference_mode():
            image = torch.sigmoid(self.model.decode(z[None].to(self.device)))
        return {"image": image_list(image), "point": self.map_point(z)}

    def samples(self, n: int, seed: int) -> dict:
        with self.lock, torch.inference_mode():
            images = self.model.sample(n, torch.Generator(device=self.device).manual_seed(seed))
        return {"images": [image_list(image) for image in images], "seed": seed}

    def map_and_sliders(self) -> dict:
        """The map's background scatter and the directions the sliders move a code along (unit vectors, each with
        the spread of the reference codes along it, so that a slider spans about +-3 of those)."""
        codes = self.reference["codes"].float().cpu() if self.reference is not None else None
        axes = self.map["axes"] / self.map["axes"].norm(dim=0).clamp_min(1e-12)
        spread = codes.var(0) if codes is not None else torch.ones(self.model.config.latent_dim)
        dims = spread.argsort(descending=True)[:SLIDER_DIMS].tolist()  # the most used dimensions
        vectors = [("map axis 1", axes[:, 0]), ("map axis 2", axes[:, 1])]
        vectors += [(f"dim {d}", torch.eye(len(spread))[d]) for d in dims]
        directions = [
            {"name": name, "vector": v.tolist(), "scale": (codes @ v).std().item() if codes is not None else 1.0}
            for name, v in vectors
        ]
        return {
            "points": self.map["points"].tolist(),
            "labels": self.map["labels"].tolist(),
            "latent_dim": self.model.config.latent_dim,
            "method": self.method,
            "directions": directions,
        }


def map_or_axes(latent_map: dict | None, latent_dim: int) -> dict:
    """The checkpoint's 2-D map of the latent space, or the first two latent dimensions with no points."""
    if latent_map is not None:
        m = latent_map
        return {
            "mean": m["mean"].float().cpu(),
            "axes": m["axes"].float().cpu(),
            "points": m["points"].float().cpu(),
            "labels": m["labels"].cpu(),
        }
    return {
        "mean": torch.zeros(latent_dim),
        "axes": torch.eye(latent_dim, 2),
        "points": torch.zeros(0, 2),
        "labels": torch.zeros(0, dtype=torch.int64),
    }


def image_list(x: torch.Tensor) -> list[list[float]]:
    """A (.., 28, 28) image as rows of intensities, 4 decimals (enough for a picture, and a quarter of the bytes)."""
    return [[round(v, 4) for v in row] for row in x.reshape(28, 28).tolist()]


# ----------------------------------------------------------------------------- reading requests


def reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")  # json accepts NaN and Infinity unless told not to


def numbers(values, length: int, what: str) -> torch.Tensor:
    """A flat list of `length` finite numbers as a float tensor, else BadRequest."""
    if not isinstance(values, list) or len(values) != length:
        raise BadRequest(400, f"{what} must be a list of {length} numbers")
    try:
        t = torch.tensor(values, dtype=torch.float32)
    except (TypeError, ValueError, OverflowError, RuntimeError):
        raise BadRequest(400, f"{what} must hold only numbers") from None
    if t.dim() != 1 or not torch.isfinite(t).all():
        raise BadRequest(400, f"{what} must hold only finite numbers")
    return t


def drawing(body: dict) -> torch.Tensor:
    """{"width", "height", "pixels"} -> grey values (H, W) in [0, 1]."""
    w, h = body.get("width"), body.get("height")
    if type(w) is not int or type(h) is not int or not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE):
        raise BadRequest(400, f"width and height must be whole numbers from 1 to {MAX_SIDE}")
    gray = numbers(body.get("pixels"), w * h, f"pixels (width x height = {w * h})")
    if gray.min() < 0 or gray.max() > 1:
        raise BadRequest(400, "pixels must be grey values in [0, 1]")
    return gray.reshape(h, w)


class Handler(BaseHTTPRequestHandler):
    """One request: route it, answer JSON (or the page), and turn every bad request into a 4xx."""

    server_version = "vae-mnist-demo"
    timeout = 30  # seconds a client may take to send its request; a stalled one then frees its thread
    ROUTES = {
        "/": ("GET",),
        "/api/map": ("GET",),
        "/api/samples": ("GET",),
        "/api/digit": ("POST",),
        "/api/decode": ("POST",),
    }

    def do_GET(self) -> None:  # every method goes through answer(), which says 405 to the wrong one
        self.answer(self.command)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def answer(self, method: str) -> None:
        url = urlsplit(self.path)
        try:
            if url.path not in self.ROUTES:
                raise BadRequest(404, f"no such page: {url.path}")
            if method not in self.ROUTES[url.path]:
                raise BadRequest(405, f"{url.path} takes {' or '.join(self.ROUTES[url.path])}, not {method}")
            if url.path == "/":
                return self.send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            self.send_json(200, self.api(url.path, parse_qs(url.query)))
        except BadRequest as err:
            self.send_json(err.status, {"error": str(err)})

    def api(self, path: str, query: dict) -> dict:
        demo: Demo = self.server.demo
        if path == "/api/map":
            return demo.map_and_sliders()
        if path == "/api/samples":
            n, seed = query.get("n", ["16"])[0], query.get("seed", [str(random.randrange(2**31))])[0]
            if not (
                n.isdecimal()
                and len(n) < 3
                and 1 <= int(n) <= 64
                and seed.isdecimal()
                and len(seed) < 20
                and int(seed) < 2**63
            ):
                raise BadRequest(400, "n must be a whole number from 1 to 64, and seed one from 0 to 2**63 - 1")
            return demo.samples(int(n), int(seed))
        body = self.read_json()
        if path == "/api/digit":
            return demo.digit(drawing(body))
        z = numbers(body.get("z"), demo.model.config.latent_dim, "z")
        if z.abs().max() > 1000:  # far beyond any code; the decoder's arithmetic could overflow to NaN
            raise BadRequest(400, "z must lie within -1000 to 1000")
        return demo.decode(z)

    def read_json(self) -> dict:
        """The request's JSON object: its size checked from Content-Length before anything is read."""
        length = self.headers.get("Content-Length")
        if length is None:
            raise BadRequest(411, "a Content-Length header is required")
        if not length.strip().isdecimal():  # isdigit() would let '²' through to int()
            raise BadRequest(400, f"invalid Content-Length: {length[:40]!r}")
        size = int(length) if len(length.strip()) < 10 else MAX_BODY + 1  # int() refuses numbers of over 4,300 digits
        if size > MAX_BODY:
            raise BadRequest(413, f"the body is {length.strip()[:20]} bytes; at most {MAX_BODY:,} are accepted")
        try:
            body = json.loads(self.rfile.read(size), parse_constant=reject_constant)
        except (ValueError, RecursionError) as err:  # JSONDecodeError and bad UTF-8 are ValueErrors
            raise BadRequest(400, f"the body is not valid JSON ({str(err)[:80]})") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "the body must be a JSON object")
        return body

    def send_json(self, status: int, obj: dict) -> None:
        self.send(status, json.dumps(obj).encode(), "application/json")

    def send(self, status: int, payload: bytes, content_type: str) -> None:
        self.close_connection = (
            True  # one request per connection: an unread body can never be taken for the next request
        )
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(payload)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, an unknown method) as JSON too."""
        self.send_json(code, {"error": message or HTTPStatus(code).phrase})

    def log_message(self, format: str, *args) -> None:
        pass  # quiet: a line per request would bury the URL line


class Server(ThreadingHTTPServer):
    daemon_threads = True  # Ctrl-C does not wait for open connections

    def handle_error(self, request, client_address) -> None:
        if not isinstance(
            sys.exc_info()[1], (ConnectionError, TimeoutError)
        ):  # a closed tab or a stalled client is no bug
            super().handle_error(request, client_address)


def make_server(demo: Demo, host: str = "127.0.0.1", port: int = 8000) -> Server:
    """The demo's HTTP server, bound (port 0: any free port) but not yet serving."""
    try:
        server = Server((host, port), Handler)
    except OSError as err:
        raise UserError(
            f"cannot serve on {host}:{port} ({err.strerror or err}); pass --port with a free port (or 0 for any)"
        ) from None
    server.demo = demo
    return server


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(demo: Demo, host: str, port: int) -> int:
    """Serve the page until Ctrl-C."""
    if not is_loopback(host):
        print(
            f"warning: --host {host} is not a loopback address: other machines may reach this demo, which has no login"
        )
    server = make_server(demo, host, port)
    host, port = server.server_address[:2]
    print(f"demo ready at http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("demo stopped")
    finally:
        server.server_close()
    return 0
