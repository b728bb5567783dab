"""A small fault-injecting HTTP proxy for S3 tests (stdlib only; a helper, not a test).

Placed in front of an S3 server (moto's, on loopback), it forwards every request (method,
path with query, headers, body) to the upstream and answers with the upstream's response;
at configured, seeded-random rates it instead injects one of:

``slowdown``       503 SlowDown with an S3 XML error body; the request is NOT forwarded
``internal_error`` 500 InternalError with an S3 XML error body; NOT forwarded
``reset``          forwarded, then the response's headers and half of its body are sent and
                   the connection is reset (RST) mid-body; only responses that have a body
                   (GET by default: objects, listings), so nothing is lost but a read
``delay``          forwarded, the response held back for a random ``delay_s`` seconds
``stall``          held back ``delay_s`` seconds BEFORE it is forwarded; dropped, never
                   forwarded, when the client hangs up meanwhile (a killed client's
                   request does not land later): the request "has not happened yet"
``lost_response``  forwarded (the upstream applies it), then the connection is reset before
                   any response byte: the client cannot tell whether it happened. Off unless
                   its rate or a rule asks for it (it is the fault that makes conditional
                   PUTs ambiguous).

Targeted, deterministic faults: :meth:`FaultProxy.add_rule` (a predicate on method, path,
headers; a kind; how many times). Rules are checked before the random draw.

Counters: ``proxy.counts[kind]`` per injected fault, ``proxy.forwarded`` (requests sent to
the upstream), ``proxy.requests`` (requests received), and ``proxy.recoveries``: for each
faulted request, the seconds until the same method + path next got a clean answer (how long
the client's retry took). Only ever listens on 127.0.0.1.

    with FaultProxy("http://127.0.0.1:5000", slowdown=0.05, reset=0.05, seed=1) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        ...
        assert proxy.counts["slowdown"] > 0
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KINDS = ("slowdown", "internal_error", "reset", "delay", "stall", "lost_response")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "trailers", "transfer-encoding", "upgrade", "expect",
              "proxy-connection"}
LOOPBACK = "127.0.0.1"

Predicate = Callable[[str, str, dict[str, str]], bool]


def s3_error_body(code: str, message: str, resource: str, request_id: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId>"
        f"<HostId>faultproxy</HostId></Error>"
    ).encode()


@dataclass
class Rule:
    """A targeted fault: ``kind`` for the requests ``match`` accepts, ``times`` of them
    (None: every one)."""

    match: Predicate
    kind: str
    times: int | None = 1
    delay_s: float | None = None
    hits: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)


class FaultProxy:
    """Threaded HTTP proxy on 127.0.0.1 in front of ``upstream`` with seeded random faults.

    Rates are per request, drawn in the order of ``KINDS``; their sum must be <= 1. A drawn
    ``reset`` on a request whose method is not in ``reset_methods`` (or whose response has
    no body) is not injected and not counted. ``eligible`` (optional) limits which requests
    may get a random fault at all; rules ignore it. ``enabled = False`` turns the random
    faults off (rules stay armed).
    """

    def __init__(self, upstream: str, *, slowdown: float = 0.0, internal_error: float = 0.0,
                 reset: float = 0.0, delay: float = 0.0, stall: float = 0.0,
                 lost_response: float = 0.0,
                 delay_s: tuple[float, float] = (0.05, 0.3), seed: int = 0,
                 reset_methods: tuple[str, ...] = ("GET",), eligible: Predicate | None = None,
                 upstream_timeout: float = 60.0):
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream!r}")
        self.upstream = upstream
        self._up_host, self._up_port = parsed.hostname, parsed.port or 80
        self.rates = {"slowdown": slowdown, "internal_error": internal_error, "reset": reset,
                      "delay": delay, "stall": stall, "lost_response": lost_response}
        if any(r < 0 for r in self.rates.values()) or sum(self.rates.values()) > 1.0 + 1e-9:
            raise ValueError(f"rates must be >= 0 and sum to <= 1, got {self.rates}")
        self.delay_s = delay_s
        self.reset_methods = tuple(m.upper() for m in reset_methods)
        self.eligible = eligible
        self.upstream_timeout = upstream_timeout
        self.enabled = True
        self.seed = seed
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter({k: 0 for k in KINDS})
        self.requests = 0
        self.forwarded = 0
        self.upstream_errors = 0  # the upstream itself failed (connection refused ...)
        self.dropped = 0  # stalled requests whose client hung up: never forwarded
        # (kind, seconds from a fault to the next clean answer to the same method + path)
        self.recoveries: list[tuple[str, float]] = []
        self.faulted: list[tuple[float, str, str, str]] = []  # (time, kind, method, path)
        self._open_faults: dict[tuple[str, str], tuple[float, str]] = {}
        self.rules: list[Rule] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- life ---------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> FaultProxy:
        if self._server is not None:
            return self
        proxy = self

        class Handler(_Handler):
            owner = proxy

        server = _Server((LOOPBACK, 0), Handler)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"faultproxy-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- configuration ------------------------------------------------------------------
    def add_rule(self, match: Predicate, kind: str, times: int | None = 1,
                 delay_s: float | None = None) -> Rule:
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r} (one of {KINDS})")
        rule = Rule(match, kind, times, delay_s)
        with self._lock:
            self.rules.append(rule)
        return rule

    def recovery(self, kind: str | None = None) -> dict:
        """How long clients took to get a clean answer after a fault (of ``kind``): count,
        median and max seconds, and how many faulted requests never got one (abandoned)."""
        with self._lock:
            rec = sorted(s for k, s in self.recoveries if kind in (None, k))
            open_ = sum(1 for _, k in self._open_faults.values() if kind in (None, k))
        return {"recovered": len(rec), "abandoned": open_,
                "median_s": rec[len(rec) // 2] if rec else None,
                "max_s": rec[-1] if rec else None}

    def summary(self) -> dict:
        return {
            "requests": self.requests, "forwarded": self.forwarded,
            "faults": dict(self.counts), "upstream_errors": self.upstream_errors,
            "dropped": self.dropped, "recovery": self.recovery(),
        }

    # ---- decisions (called from handler threads) ---------------------------------------
    def _choose(self, method: str, path: str, headers: dict[str, str]
                ) -> tuple[str | None, float]:
        """(fault kind or None, delay seconds should it be ``delay``)."""
        with self._lock:
            self.requests += 1
            for rule in self.rules:
                if rule.times is not None and rule.hits >= rule.times:
                    continue
                if rule.match(method, path, headers):
                    rule.hits += 1
                    rule.requests.append((method, path))
                    return rule.kind, (self.delay_s[1] if rule.delay_s is None
                                       else rule.delay_s)
            u = self._rng.random()  # drawn for every request, so the sequence is the seed's
            delay = self._rng.uniform(*self.delay_s)
            if not self.enabled or (self.eligible is not None
                                    and not self.eligible(method, path, headers)):
                return None, 0.0
            edge = 0.0
            for kind in KINDS:
                edge += self.rates[kind]
                if u < edge:
                    if kind == "reset" and method not in self.reset_methods:
                        return None, 0.0
                    return kind, delay
            return None, 0.0

    def _record_fault(self, kind: str, method: str, path: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.counts[kind] += 1
            self.faulted.append((now, kind, method, path))
            self._open_faults.setdefault((method, path), (now, kind))

    def _record_clean(self, method: str, path: str) -> None:
        with self._lock:
            opened = self._open_faults.pop((method, path), None)
            if opened is not None:
                self.recoveries.append((opened[1], time.monotonic() - opened[0]))


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # clients open many connections at once (socketserver: 5)
    daemon_threads = True
    block_on_close = False


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive with the client, as S3 does

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def handle_one_request(self) -> None:
        with contextlib.suppress(ConnectionError, TimeoutError, OSError):
            super().handle_one_request()

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = bytearray()
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline(65537)  # CRLF after the chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        owner = self.owner
        method = self.command.upper()
        body = self._read_body()
        kind, delay = owner._choose(method, self.path, self.headers)  # case-insensitive .get
        if kind in ("slowdown", "internal_error"):
            owner._record_fault(kind, method, self.path)
            status, code, message = ((503, "SlowDown", "Please reduce your request rate.")
                                     if kind == "slowdown" else
                                     (500, "InternalError", "We encountered an internal error. "
                                      "Please try again."))
            self._send_error(status, code, message, method)
            return
        if kind == "stall":
            owner._record_fault(kind, method, self.path)
            if not self._wait_while_connected(delay):
                with owner._lock:
                    owner.dropped += 1
                self.close_connection = True
                return
        try:
            status, reason, resp_headers, resp_body = self._forward(method, body)
        except (OSError, http.client.HTTPException) as exc:
            with owner._lock:
                owner.upstream_errors += 1
            self._send_error(502, "BadGateway", f"upstream failed: {exc}", method)
            return
        if kind == "lost_response":
            owner._record_fault(kind, method, self.path)
            self._reset()
            return
        if kind == "reset" and len(resp_body) >= 2:
            owner._record_fault(kind, method, self.path)
            self._send_head(status, reason, resp_headers, len(resp_body))
            self.wfile.write(resp_body[: len(resp_body) // 2])
            self.wfile.flush()
            self._reset()
            return
        if kind == "delay":
            owner._record_fault(kind, method, self.path)
            time.sleep(delay)
        if status < 500:
            owner._record_clean(method, self.path)
        self._send_head(status, reason, resp_headers,
                        None if method == "HEAD" else len(resp_body))
        if method != "HEAD" and resp_body:
            self.wfile.write(resp_body)
        self.wfile.flush()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle

    def _wait_while_connected(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; False as soon as the client has closed its connection."""
        import select

        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.connection], [], [], min(left, 0.05))
            if readable:
                try:
                    if self.connection.recv(1, socket.MSG_PEEK) == b"":
                        return False
                except OSError:
                    return False
                time.sleep(min(left, 0.05))  # pipelined bytes: still connected
        return True

    def _forward(self, method: str, body: bytes):
        owner = self.owner
        conn = http.client.HTTPConnection(owner._up_host, owner._up_port,
                                          timeout=owner.upstream_timeout)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            headers.pop("Content-Length", None)
            headers.pop("content-length", None)
            if body or method in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn.request(method, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read() if method != "HEAD" else b""
            resp_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
            with owner._lock:
                owner.forwarded += 1
            return resp.status, resp.reason, resp_headers, data
        finally:
            conn.close()

    def _send_head(self, status: int, reason: str, headers: list[tuple[str, str]],
                   length: int | None) -> None:
        self.send_response_only(status, reason)
        for k, v in headers:
            if length is not None and k.lower() == "content-length":
                continue
            self.send_header(k, v)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send_error(self, status: int, code: str, message: str, method: str) -> None:
        request_id = uuid.uuid4().hex[:16].upper()
        resource = urllib.parse.urlsplit(self.path).path
        body = b"" if method == "HEAD" else s3_error_body(code, message, resource, request_id)
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Content-Length", str(len(body)))
        if status == 503:
            self.send_header("Retry-After", "0")
        self.end_headers()
        if body:
            self.wfile.write(body)
        self.wfile.flush()

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0), as a dying server would."""
        self.close_connection = True
        with contextlib.suppress(OSError, ValueError):
            self.rfile.close()  # its reference would keep the socket open past close()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self.connection.close()

    def finish(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().finish()
