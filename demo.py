"""python main.py demo: a page on which you draw a digit and watch the VAE answer.

The page (demo.html: HTML and JavaScript, nothing from the internet) sends the drawing's grey values
here; the server (the standard library's http.server) prepares them as `reconstruct` does, encodes,
decodes and scores them:

    GET  /                 the page
    GET  /api/map          the latent map (reference points, labels, what its axes are), the
                           sliders, what the score means, the scores from which a digit is unusual
    POST /api/digit        {"width": W, "height": H, "pixels": [W*H grey values in [0, 1]]} (rows)
                           -> the prepared 28x28, its reconstruction, code z, map point, score,
                           percentile, verdict and the sentence that says them (anomaly.describe)
    POST /api/decode       {"z": [latent_dim numbers]}, optionally with "point": [x, y], a place on
                           the map to move z to along the map's directions
                           -> the decoded 28x28, its code z and its map point
    GET  /api/samples?n=16 n digits decoded from z ~ N(0, I) (optional &seed=S)

Images travel as 28x28 lists of intensities in [0, 1]. A bad request gets a 4xx answer {"error":
"..."}; HEAD works wherever GET does. POSTs take Content-Type: application/json.

Host and Origin are checked because any web page can rename its own site to this machine's address
(DNS rebinding) or post to it from elsewhere: the server answers only requests addressed to itself,
sent from its own page or no page.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import math
import random
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import torch

import anomaly
import data
import prepare
from config import MAX_SEED
from files import UserError
from model import VAE, kl_per_dim

PAGE = Path(__file__).resolve().parent / "demo.html"
MAX_BODY = 1_000_000  # bytes; a 280x280 drawing with 2-3 decimals per value is about 200 kB
MAX_SIDE = 1000  # pixels per side of a drawing
SLIDER_DIMS = 4  # latent dimensions offered as sliders, besides the two map axes
ORDINALS = ("", "2nd ", "3rd ", "4th ")  # one per slider dimension
KL_CODES = 2000  # codes decoded and encoded again to estimate the KL per dimension
# one line under the score: what it measures, for someone who has never met it
MEANING = {
    "combined": "The combined score says how unlike the training digits a drawing is, in standard "
    "deviations from an average digit (0): a negative score is normal, just more typical than "
    "average; only a high one is unusual.",
    "elbo": "The score is the negative ELBO in nats: how much of the drawing the model fails to "
    "explain; higher is stranger.",
}


class BadRequest(Exception):
    """A request the server cannot answer: becomes an HTTP 4xx with a one-line JSON error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Demo:
    """The model and what the page needs from it. Every model call holds the lock: torch modules are
    not promised to be thread-safe, and the server answers each request on its own thread."""

    def __init__(
        self,
        model: VAE,
        reference: dict | None,
        latent_map: dict | None = None,
        binarize: bool = False,
    ) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.reference = reference
        self.binarize = binarize
        # the others need the reference
        self.method = anomaly.DEFAULT_METHOD if reference is not None else "elbo"
        self.lock = threading.Lock()
        self.map = map_or_first_dims(latent_map, model.latent_dim)
        self.codes = reference["codes"].float().cpu() if reference is not None else None
        self.lift = map_lift(self.map, self.codes)
        # the map axes a code can move along (a one-dimensional map has one)
        self.reachable = (self.lift @ self.map["axes"]).diagonal() > 0.5
        self.kl, self.kl_measure = dimension_kl(model, latent_map, self.codes)
        scores = (
            (reference or {}).get("test_scores") if self.method == anomaly.DEFAULT_METHOD else None
        )
        self.test_scores = None if scores is None else scores.float().cpu()
        self.thresholds = (
            verdict_thresholds(self.test_scores) if self.test_scores is not None else None
        )

    def map_point(self, z: torch.Tensor) -> torch.Tensor:
        return (z.cpu() - self.map["mean"]) @ self.map["axes"]

    def digit(self, gray: torch.Tensor) -> dict:
        """Prepare a drawing (H, W) as MNIST was made, then reconstruct and score it."""
        try:
            x = prepare.prepare_digit(gray)[None].to(self.device)
        except prepare.ImageError as err:  # a blank drawing, say
            raise BadRequest(422, str(err)) from None
        # a model trained on binarized digits is scored on a binarized image, as reconstruct does
        if self.binarize:
            seeded = torch.Generator(device=self.device).manual_seed(anomaly.SCORE_SEED)
            x = data.binarize(x, seeded)
        with self.lock, torch.inference_mode():
            mu, _ = self.model.encode(x)
            reconstruction = torch.sigmoid(self.model.decode(mu))
            value = anomaly.score(self.model, x, method=self.method, reference=self.reference)
        value = value.item()
        rank = self.percentile(value)
        return {
            "prepared": image_list(x),
            "reconstruction": image_list(reconstruction),
            "z": mu[0].tolist(),
            "point": self.map_point(mu[0]).tolist(),
            "score": value,
            "percentile": rank,
            "verdict": None if rank is None else anomaly.verdict(rank),
            "description": anomaly.describe(value, rank),
            "method": self.method,
        }

    def percentile(self, value: float) -> float | None:
        """Percent of test digits scoring at most `value`; None when the checkpoint holds no test
        scores."""
        return anomaly.percentile(self.test_scores, value) if self.test_scores is not None else None

    def decode(self, z: torch.Tensor, point: torch.Tensor | None = None) -> dict:
        """The digit decoded from code z; with a map point, from z moved there first (move_to)."""
        if point is not None:
            z = self.move_to(z, point)
        with self.lock, torch.inference_mode():
            image = torch.sigmoid(self.model.decode(z[None].to(self.device)))
        return {"image": image_list(image), "z": z.tolist(), "point": self.map_point(z).tolist()}

    def move_to(self, z: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
        """Code z moved to a place on the map the way the reference codes change across the map
        (map_lift), so that the page's map sliders, a click and the ring are one control. An axis
        no code moves along (a one-dimensional map) stays where z is."""
        offset = torch.where(self.reachable, point - self.map_point(z), 0.0)
        return z + offset @ self.lift

    def samples(self, n: int, seed: int) -> dict:
        with self.lock, torch.inference_mode():
            images = self.model.sample(n, torch.Generator(device=self.device).manual_seed(seed))
        return {"images": [image_list(image) for image in images], "seed": seed}

    def map_and_sliders(self) -> dict:
        """The map's background scatter and what its axes are, the sliders, what the score means
        and the verdict thresholds."""
        first_dims = self.map["points"].numel() == 0
        axes = (
            "latent dimensions z0 and z1 (this checkpoint holds no map)"
            if first_dims
            else "the two directions in the code space that best separate the ten digits "
            "(Fisher's discriminant)"
        )
        return {
            "points": self.map["points"].tolist(),
            "labels": self.map["labels"].tolist(),
            "map_axes": axes,
            "origin": self.map["mean"].tolist(),
            "latent_dim": self.model.latent_dim,
            "method": self.method,
            "meaning": MEANING[self.method],
            "sliders": sliders(self.reachable.tolist(), self.kl, self.codes),
            "kl_measure": self.kl_measure,
            "verdicts": list(anomaly.VERDICTS),
            "verdict_percentiles": list(anomaly.VERDICT_PERCENTILES),
            "thresholds": self.thresholds,
            "test_digits": 0 if self.test_scores is None else len(self.test_scores),
        }


def map_lift(space: dict, codes: torch.Tensor | None) -> torch.Tensor:
    """(2, latent_dim): how a code changes per unit of each map axis, with lift @ axes = identity.
    Not the axes themselves, which on the shipped checkpoint barely change the decoded digit: the
    way the reference codes change, on average, across the map (their least-squares regression on
    their map places), so that a code moved across the map changes as the digits there do. With no
    reference codes, the least change of code (the axes' pseudo-inverse)."""
    if codes is None:
        return torch.linalg.pinv(space["axes"])
    points = (codes - space["mean"]) @ space["axes"]
    return torch.linalg.lstsq(points - points.mean(0), codes - codes.mean(0)).solution


@torch.inference_mode()
def dimension_kl(
    model: VAE, space: dict | None, codes: torch.Tensor | None
) -> tuple[torch.Tensor, str]:
    """Each latent dimension's mean KL (nats), by which `evaluate` ranks them, and how it was
    measured: the test digits' values if the checkpoint's map stores them; else an estimate from
    reference codes (or, with none, codes drawn from the prior) decoded and encoded again, as the
    checkpoint holds no images and no log-variances."""
    stored = (space or {}).get("kl_per_dim")
    if stored is not None:
        return stored.float().cpu(), "mean KL per dimension on the test digits"
    if codes is None:
        codes = torch.randn(KL_CODES, model.latent_dim, generator=torch.Generator().manual_seed(0))
        source = "prior samples"
    else:
        codes = codes[:KL_CODES]
        source = "reference digits' codes"
    device = next(model.parameters()).device
    images = torch.sigmoid(model.decode(codes.to(device)))
    mu, logvar = model.encode(images)
    measure = f"mean KL per dimension, estimated on {len(codes):,} {source} decoded again"
    return kl_per_dim(mu, logvar).double().mean(0).float().cpu(), measure


def sliders(reachable: list[bool], kl: torch.Tensor, codes: torch.Tensor | None) -> list[dict]:
    """The page's sliders: one per map axis a code can move along (its value is the code's place
    on that axis), then one per latent dimension of largest mean KL, `evaluate`'s ranking (its value
    is the change of that dimension, in spreads of the reference codes, holding the code's place
    on the map)."""
    where = ("left-right", "up-down")
    out = [
        {"name": f"map axis {k + 1} ({where[k]} on the map)", "axis": k}
        for k in range(2)
        if reachable[k]
    ]
    spread = codes.std(0) if codes is not None and len(codes) > 1 else torch.ones(len(kl))
    for rank, d in enumerate(kl.argsort(descending=True)[:SLIDER_DIMS].tolist()):
        name = f"latent z{d} ({ORDINALS[rank]}most-used: KL {kl[d].item():.2f} nats)"
        out.append({"name": name, "dim": d, "scale": spread[d].item()})
    return out


def verdict_thresholds(test_scores: torch.Tensor) -> list[float]:
    """The scores from which a digit is unusual and very unusual: the k-th lowest of the n test
    digits' scores with k = ceil(p n / 100), so that a score reaches it exactly when anomaly.verdict
    of its percentile says so."""
    ranked = test_scores.sort().values
    percents = anomaly.VERDICT_PERCENTILES
    return [ranked[math.ceil(p * len(ranked) / 100) - 1].item() for p in percents]


def map_or_first_dims(space: dict | None, latent_dim: int) -> dict:
    """The checkpoint's 2-D map of the latent space, or the first two latent dimensions with no
    points."""
    if space is not None:
        return {
            key: space[key].cpu() if key == "labels" else space[key].float().cpu()
            for key in ("mean", "axes", "points", "labels")
        }
    return {
        "mean": torch.zeros(latent_dim),
        "axes": torch.eye(latent_dim, 2),
        "points": torch.zeros(0, 2),
        "labels": torch.zeros(0, dtype=torch.int64),
    }


def image_list(x: torch.Tensor) -> list[list[float]]:
    """A (.., 28, 28) image as rows of intensities, 4 decimals (enough for a picture, and a quarter
    of the bytes)."""
    return [[round(v, 4) for v in row] for row in x.reshape(28, 28).tolist()]


# ----------------------------------------------------------------------------- reading requests


def reject_constant(name: str):
    # json accepts NaN and Infinity unless told not to
    raise ValueError(f"{name} is not a number JSON allows")


def numbers(values, length: int, what: str, limit: float = math.inf) -> torch.Tensor:
    """A flat list of `length` finite numbers within +-limit as a float tensor, else BadRequest."""
    if not isinstance(values, list) or len(values) != length:
        raise BadRequest(400, f"{what} must be a list of {length} numbers")
    # true and false are numbers to torch.tensor
    if not all(type(v) is float or type(v) is int for v in values):
        raise BadRequest(400, f"{what} must hold only numbers (not true, false, text or lists)")
    try:
        t = torch.tensor(values, dtype=torch.float32)
    except (TypeError, ValueError, OverflowError, RuntimeError):
        raise BadRequest(400, f"{what} must hold only numbers") from None
    if not torch.isfinite(t).all():
        raise BadRequest(400, f"{what} must hold only finite numbers")
    if t.abs().max() > limit:  # far beyond any code; the decoder's arithmetic could overflow to NaN
        raise BadRequest(400, f"{what} must lie within -{limit:g} to {limit:g}")
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


def decode_request(demo: Demo, body: dict) -> dict:
    """{"z": code} or {"z": code, "point": a place on the map to move it to} -> the decoded
    digit."""
    z = numbers(body.get("z"), demo.model.latent_dim, "z", limit=1000)
    if "point" not in body:
        return demo.decode(z)
    return demo.decode(z, numbers(body["point"], 2, "point", limit=1000))


def split_host(header: str) -> tuple[str | None, int | None]:
    """A Host header's name (lower case; an IPv6 address without its brackets) and port (80 when it
    gives none), or (None, None) when it is not of that form."""
    if header.startswith("["):  # an IPv6 address: [::1]:8000
        name, _, rest = header[1:].lower().partition("]")
        if rest and not rest.startswith(":"):
            return None, None
        port = rest[1:] if rest else None
    else:
        # a second colon leaves the port not a number
        name, colon, port = header.lower().partition(":")
        port = port if colon else None
    if not name:
        return None, None
    if port is None:
        return name, 80
    return (
        (name, int(port)) if port.isascii() and port.isdigit() and len(port) <= 5 else (None, None)
    )


def is_loopback_name(name: str) -> bool:
    try:
        return name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_own_host(header: str, host: str, address: str, port: int) -> bool:
    """Whether a request's Host header names this server, bound to `address` (the resolved --host)
    and `port`: on a loopback address, any loopback name with the port; on one address, that address
    or the --host as given; on every address (0.0.0.0, ::), any name, as no single one is the right
    one."""
    bound = ipaddress.ip_address(address.split("%")[0])
    if bound.is_unspecified:
        return True
    name, asked_port = split_host(header)
    if name is None or asked_port != port:
        return False
    if bound.is_loopback:
        return is_loopback_name(name)
    try:
        return name == host.lower() or ipaddress.ip_address(name) == bound
    except ValueError:
        return False


class Handler(BaseHTTPRequestHandler):
    """One request: check who sent it and to whom, route it, answer JSON (or the page), and turn
    every bad request into a 4xx."""

    server_version = "vae-mnist-demo"
    timeout = 30  # seconds each read or write may wait; a stalled client then frees its thread
    # seconds for the whole request, however it trickles in (a class attribute: tests shorten it)
    deadline = 30.0
    ROUTES: ClassVar[dict[str, tuple[str, ...]]] = {
        "/": ("GET", "HEAD"),
        "/api/map": ("GET", "HEAD"),
        "/api/samples": ("GET", "HEAD"),
        "/api/digit": ("POST",),
        "/api/decode": ("POST",),
    }

    def setup(self) -> None:
        super().setup()
        # a per-read timeout never fires on a byte a second
        self.timer = threading.Timer(self.deadline, self.cut_off)
        self.timer.daemon = True
        self.timer.start()

    def finish(self) -> None:
        self.timer.cancel()
        super().finish()

    def cut_off(self) -> None:
        """The deadline has passed: shut the connection, so that the thread's waiting read or write
        returns now."""
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed
            pass

    def do_GET(self) -> None:  # every method goes through answer(), which says 405 to the wrong one
        self.answer(self.command)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def answer(self, method: str) -> None:
        url = urlsplit(self.path)
        try:
            self.check_sender()
            if url.path not in self.ROUTES:
                raise BadRequest(404, f"no such page: {url.path}")
            if method not in self.ROUTES[url.path]:
                raise BadRequest(
                    405, f"{url.path} takes {' or '.join(self.ROUTES[url.path])}, not {method}"
                )
            if url.path == "/":
                return self.send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            self.send_json(200, self.api(url.path, parse_qs(url.query)))
        except BadRequest as err:
            self.send_json(err.status, {"error": str(err)})

    def check_sender(self) -> None:
        """421 for a request addressed to another site's name, 403 for one sent by another site's
        page."""
        hosts = self.headers.get_all("Host") or [""]
        server: Server = self.server
        if len(hosts) > 1 or not is_own_host(
            hosts[0], server.host, server.server_address[0], server.server_port
        ):
            raise BadRequest(
                421,
                f"this server does not answer for the host {hosts[0][:80]!r}; "
                "open the page at its own address",
            )
        origin = self.headers.get("Origin")
        if origin is not None and origin.lower() != f"http://{hosts[0]}".lower():
            raise BadRequest(
                403,
                f"requests from the page at {origin[:80]!r} are refused: "
                "only this server's own page may send them",
            )

    def api(self, path: str, query: dict) -> dict:
        demo: Demo = self.server.demo
        if path == "/api/map":
            return demo.map_and_sliders()
        if path == "/api/samples":
            n, seed = (
                query.get("n", ["16"])[0],
                query.get("seed", [str(random.randrange(2**31))])[0],
            )
            if not (
                n.isdecimal()
                and len(n) < 3
                and 1 <= int(n) <= 64
                and seed.isdecimal()
                and len(seed) < 20
                and int(seed) <= MAX_SEED
            ):
                raise BadRequest(
                    400, f"n must be a whole number from 1 to 64, and seed one from 0 to {MAX_SEED}"
                )
            return demo.samples(int(n), int(seed))
        body = self.read_json()
        return demo.digit(drawing(body)) if path == "/api/digit" else decode_request(demo, body)

    def read_json(self) -> dict:
        """The request's JSON object: its type and size checked from the headers before anything is
        read."""
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        # a form or text/plain is what another site's page can post without asking
        if kind != "application/json":
            raise BadRequest(
                415,
                f"send the body as Content-Type: application/json, not {kind[:40] or 'untyped'}",
            )
        length = self.headers.get("Content-Length")
        if length is None:
            raise BadRequest(411, "a Content-Length header is required")
        if not length.strip().isdecimal():  # isdigit() would let '²' through to int()
            raise BadRequest(400, f"invalid Content-Length: {length[:40]!r}")
        # int() refuses numbers of over 4,300 digits
        size = int(length) if len(length.strip()) < 10 else MAX_BODY + 1
        if size > MAX_BODY:
            raise BadRequest(
                413, f"the body is {length.strip()[:20]} bytes; at most {MAX_BODY:,} are accepted"
            )
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
        # one request per connection: an unread body is never taken for the next request
        self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":  # HEAD: the headers GET would send, and no body
            self.wfile.write(payload)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, an unknown method) as JSON too."""
        self.send_json(code, {"error": message or HTTPStatus(code).phrase})

    def log_message(self, format: str, *args) -> None:
        pass  # quiet: a line per request would bury the URL line


class Server(ThreadingHTTPServer):
    daemon_threads = True  # Ctrl-C does not wait for open connections
    # connections waiting to be accepted: the default 5 resets some of 50 clients arriving at once
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily, host: str) -> None:
        self.address_family = family  # read when the socket is made, in the base class's __init__
        self.host = host  # --host as given, a name the Host header may use
        super().__init__(address, Handler)

    def handle_error(self, request, client_address) -> None:
        # a closed tab, a stalled client: no bug
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def resolve(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    """The address family and numeric address --host names (a name: its first address), else a
    UserError."""
    try:
        found = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    # gaierror is an OSError; a bad name can be a UnicodeError
    except (OSError, UnicodeError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise UserError(
            f"--host {host} is unresolvable ({reason}); "
            "pass an address of this machine, such as 127.0.0.1 or ::1"
        ) from None
    family, _, _, _, address = found[0]
    return family, address[0]


def make_server(demo: Demo, host: str = "127.0.0.1", port: int = 8000) -> Server:
    """The demo's HTTP server, bound (port 0: any free port) but not yet serving."""
    family, address = resolve(host, port)
    try:
        server = Server((address, port), family, host)
    except OSError as err:
        if err.errno in (errno.EADDRINUSE, errno.EACCES):  # the port is taken, or needs privileges
            advice = "pass --port with a free port (or 0 for any)"
        else:  # an address of another machine, or a family this one lacks
            advice = "pass --host with an address of this machine, such as 127.0.0.1"
        raise UserError(
            f"cannot serve on {host_port(host, port)} ({err.strerror or err}); {advice}"
        ) from None
    server.demo = demo
    return server


def exposure_warning(host: str) -> str | None:
    """The warning for a --host that other machines may reach (the demo has no login); None for a
    loopback one."""
    _, address = resolve(host, 0)
    if ipaddress.ip_address(address.split("%")[0]).is_loopback:
        return None
    return (
        f"warning: --host {host} is not a loopback address: "
        "other machines may reach this demo, which has no login"
    )


def host_port(host: str, port: int) -> str:
    # an IPv6 address in brackets, as URLs write it
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def page_url(server: Server) -> str:
    return f"http://{host_port(*server.server_address[:2])}/"


def serve(server: Server) -> None:
    """Say where the page is, then serve until Ctrl-C, which ends with one line."""
    try:
        print(f"demo ready at {page_url(server)} (Ctrl-C stops it)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("demo stopped")
    finally:
        server.server_close()
