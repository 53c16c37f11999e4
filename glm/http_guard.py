"""glm-serve's checks at the HTTP edge, before a request reaches the OpenAI routes: the `Host` and `Origin` it
comes with, its `Content-Type` and body size, the API key and where that key comes from.

Why: a server on loopback without a key is still reachable from any web page the user opens. A page may post a
"simple" request (a form's content type, no preflight) to http://127.0.0.1:8000, and DNS rebinding can point a
name the page owns at 127.0.0.1, which makes the page same-origin with the server. Checking `Host` stops the
second; refusing foreign `Origin`s and requiring `application/json` (which a page can only send after a CORS
preflight) stops the first. No FastAPI here: the guard is plain ASGI, the body parser plain functions.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import os
import re
from pathlib import Path

from glm.errors import CLIError

DEFAULT_MAX_BODY = 4 << 20  # bytes: a whole 2048-token context is tens of KB of text, so 4 MiB leaves a wide margin
MAX_DEPTH = 64  # nesting of arrays and objects in a body; deeper is refused before anything recurses into it
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
_SURROGATE = re.compile("[\ud800-\udfff]")
_WRITES = frozenset({"POST", "PUT", "PATCH"})


class Refused(Exception):
    """A request refused at the edge, answered in OpenAI's error shape (as glm.openai_protocol.APIError)."""

    def __init__(self, status: int, message: str, code: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.headers = status, message, code, type_, None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}}

    async def send(self, send) -> None:
        """Answer through ASGI's `send` (the guard runs before the app, so before its exception handlers)."""
        data = json.dumps(self.body()).encode()
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


def _hostname(host: str) -> str:
    """The name of a Host header without its port: `[::1]:8000` -> `::1`, `Example.COM.:80` -> `example.com`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HTTPGuard:
    """What glm-serve accepts: Host names, cross-origin browser origins, body size, and the API key (None: no key).

    Allowed hosts: the address the server binds to; localhost and the loopback addresses when it binds to one of
    them or to all addresses (0.0.0.0, ::), and then any IP address too (a rebinding page always sends its own
    name, never an address); and `allowed_hosts` (`*.example.com` for its subdomains, `*` for any).
    """

    def __init__(self, bind: str = "127.0.0.1", allowed_hosts=(), cors_origins=(), max_body_bytes: int =
                 DEFAULT_MAX_BODY, api_key: str | None = None):
        bind = _hostname(bind)
        self.any_address = bind in ("", "0.0.0.0", "::")
        self.hosts = {bind, *(_hostname(h) for h in allowed_hosts)}
        if self.any_address or bind in LOOPBACK or (_is_ip(bind) and ipaddress.ip_address(bind).is_loopback):
            self.hosts |= LOOPBACK
        self.origins = frozenset(o.rstrip("/").lower() for o in cors_origins)
        self.max_body_bytes, self.api_key = max_body_bytes, api_key

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ=os.environ) -> HTTPGuard:
        return cls(args.host, args.allowed_hosts, args.cors_origins, args.max_body_bytes, api_key_from(args, environ))

    def host_ok(self, host: str) -> bool:
        name = _hostname(host)
        return ("*" in self.hosts or name in self.hosts or (self.any_address and _is_ip(name))
                or any(h.startswith("*.") and name.endswith(h[1:]) for h in self.hosts))

    def cors_allowed(self, origin: str) -> bool:
        """Whether a cross-origin browser page may call the API (then Starlette's CORSMiddleware answers it)."""
        return "*" in self.origins or origin.rstrip("/").lower() in self.origins

    def refusal(self, method: str, headers: dict[str, str]) -> Refused | None:
        """Why a request (its method and lower-cased headers) is refused before routing; None when it is not."""
        host = headers.get("host")
        if host is not None and not self.host_ok(host):
            return Refused(400, f"the Host {host!r} is not a name this server answers to (a guard against DNS "
                                "rebinding): start glm-serve with --allowed-hosts NAME to allow it", "invalid_host")
        origin = headers.get("origin")
        # Same-origin (a page served from this very host) is fine; Host has been checked above.
        same = host is not None and origin is not None and origin.partition("://")[2].lower() == host.lower()
        if origin is not None and not same and not self.cors_allowed(origin):
            return Refused(403, f"cross-origin requests from {origin!r} are refused: start glm-serve with "
                                "--cors-origins ORIGIN to allow that web page to call it", "origin_not_allowed",
                           "permission_error")
        if method in _WRITES:
            media = headers.get("content-type", "").partition(";")[0].strip().lower()
            if media != "application/json":
                return Refused(415, f"the body must be JSON sent with 'Content-Type: application/json', got "
                                    f"{media or 'no Content-Type'!r}", "unsupported_media_type")
        return None

    def middleware(self, app):
        """The ASGI app that answers refused requests itself and passes the others to `app`."""

        async def guarded(scope, receive, send):
            if scope["type"] == "http":
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
                refused = self.refusal(scope["method"], headers)
                if refused is not None:
                    return await refused.send(send)
            await app(scope, receive, send)

        return guarded

    def install(self, app) -> None:
        """Put the guard in front of a Starlette/FastAPI app, with CORS for the allowed origins."""
        if self.origins:
            from starlette.middleware.cors import CORSMiddleware

            app.add_middleware(CORSMiddleware, allow_origins=sorted(self.origins), allow_methods=["GET", "POST"],
                               allow_headers=["*"])
        app.add_middleware(self.middleware)  # added last: it runs first

    def authorize(self, headers) -> None:
        if self.api_key is None:
            return
        got = headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
            raise Refused(401, "invalid or missing API key: send 'Authorization: Bearer KEY'", "invalid_api_key",
                          "authentication_error")

    async def read_json(self, request) -> dict:
        """The body of a Starlette request as a JSON object, read up to the size limit and parsed off the loop."""
        limit = self.max_body_bytes
        size = request.headers.get("content-length", "")
        chunks, got = [], 0
        if not (size.isdigit() and int(size) > limit):
            async for chunk in request.stream():
                got += len(chunk)
                if got > limit:
                    break
                chunks.append(chunk)
        if got > limit or (size.isdigit() and int(size) > limit):
            raise Refused(413, f"the request body is over this server's limit of {limit} bytes (--max-body-bytes)",
                          "body_too_large")
        return await asyncio.to_thread(parse_json, b"".join(chunks))


def _constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes) -> dict:
    """A request body as a JSON object of valid Unicode, nested at most MAX_DEPTH deep; else Refused (400)."""
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_constant)
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError; so is NaN here, and a huge integer
        raise Refused(400, "the request body is not valid JSON (UTF-8)") from None
    except RecursionError:
        raise Refused(400, f"the request body is nested too deeply: at most {MAX_DEPTH} levels") from None
    if not isinstance(body, dict):
        raise Refused(400, "the request body must be a JSON object")
    stack = [(body, 1)]  # no recursion: the depth is what is checked
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            # A lone surrogate (a "\ud800" escape) is valid JSON but no Unicode text: it cannot be encoded back.
            if not v.isascii() and _SURROGATE.search(v):
                raise Refused(400, "the request body holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                                   "escape): send valid Unicode text")
        elif isinstance(v, (dict, list)):
            if depth > MAX_DEPTH:
                raise Refused(400, f"the request body is nested too deeply: at most {MAX_DEPTH} levels")
            items = [*v.keys(), *v.values()] if isinstance(v, dict) else v
            stack += [(x, depth + 1) for x in items if isinstance(x, (str, dict, list))]
    return body


# ---------------------------------------------------------------------------------------------------- options


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _origins(s: str) -> list[str]:
    out = _names(s)
    for o in out:
        if o != "*" and not re.fullmatch(r"https?://[^/\s]+/?", o):
            raise argparse.ArgumentTypeError(f"expected an origin like http://localhost:3000 (or *), got {o!r}")
    return out


def _size(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1024:
        raise argparse.ArgumentTypeError(f"expected a number of bytes of at least 1024, got {s!r}")
    return v


def add_args(parser: argparse.ArgumentParser) -> None:
    """glm-serve's options of access: the API key and its sources, Host and Origin checks, body size."""
    g = parser.add_argument_group("access (see docs/serve.md)")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/ requests; other users see it in `ps`: prefer "
                        "the GLM_API_KEY environment variable or --api-key-file")
    g.add_argument("--api-key-file", default=None, metavar="PATH", help="read the API key from this file")
    g.add_argument("--allowed-hosts", type=_names, action="extend", default=[], metavar="NAMES",
                   help="Host names clients may reach this server by, comma-separated, besides its address "
                        "(and localhost on loopback); *.example.com allows subdomains, * any (no DNS-rebinding "
                        "guard)")
    g.add_argument("--cors-origins", type=_origins, action="extend", default=[], metavar="ORIGINS",
                   help="web page origins (e.g. http://localhost:3000, comma-separated, or *) whose scripts may "
                        "call this server; pages of other origins are refused (default: none)")
    g.add_argument("--max-body-bytes", type=_size, default=DEFAULT_MAX_BODY, metavar="N",
                   help=f"largest request body; larger ones are answered 413 (default: {DEFAULT_MAX_BODY}, 4 MiB)")


def api_key_from(args: argparse.Namespace, environ=os.environ) -> str | None:
    """The API key: --api-key, else --api-key-file's content, else $GLM_API_KEY (empty: none). Raises CLIError."""
    if args.api_key is not None and args.api_key_file is not None:
        raise CLIError("give the API key once: --api-key or --api-key-file, not both")
    if args.api_key_file is not None:
        path = Path(args.api_key_file).expanduser()
        try:
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise CLIError(f"cannot read the API key from {path}: {getattr(e, 'strerror', None) or e}") from None
        if not key or "\n" in key:
            raise CLIError(f"{path} must hold the API key alone, on one line")
        return key
    if args.api_key is not None:
        if not args.api_key.strip():
            raise CLIError("--api-key is empty: give a key, or leave the option out for none")
        return args.api_key
    return environ.get("GLM_API_KEY") or None
