"""A fake Danbooru JSON API for the crawler's tests: a real HTTP server on loopback addresses only.

What it serves, like danbooru.donmai.us does:
  /posts.json   tags (AND of tags, `-tag` negation, `rating:g,s`), limit (capped at 200), page = N (refused past
                1000, like Danbooru) or b<id> / a<id> cursors; newest first. Deleted posts come without file URLs.
  /tags.json    search[category], search[order]=count|name, limit, page.
  /data/...     image files, on the API host (127.0.0.1) and on the "CDN" host (`localhost`, same port).
A second listener on 127.0.0.2 plays a host that is NOT allowed: one post points its files there, and the tests check
that nobody ever asks it for anything.

The posts (POSTS) cover what the crawler must handle: several characters and artists, ratings, a multi-character post,
an excluded tag, a deleted post, a duplicate md5, a file on another host, a `../../x` file_ext, an HTML page served as
.jpg, and a post whose bytes do not match its md5 (its large file is not an image either). `kind` says which; "good"
posts are the ones a crawl with TEST_FILTERS keeps.

Transient faults are injected per test with `inject(match, kind, times)`: the first `times` requests whose target
contains `match` fail (429 + Retry-After, 500, 503, a timeout, a truncated body, invalid JSON, a complete body with
damaged bytes), later ones succeed.
Every request is logged (start/end time, host, target, status, Authorization) so tests can assert rates, concurrency,
gaps after a 429 and "downloaded exactly once".

Run standalone: `python tests/danbooru_server.py --port-file F [--image-delay S]` writes the port to F and serves
until interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from PIL import Image, ImageDraw

API_HOST = "127.0.0.1"
CDN_HOST = "localhost"  # resolves to 127.0.0.1 (see /etc/hosts): same listener, another host name
OTHER_HOST = "127.0.0.2"  # loopback too, but never in the crawler's allow-list
FAULT_KINDS = ("429", "500", "503", "timeout", "truncate", "badjson", "corrupt")
# What a crawl with these filters keeps is exactly the posts of kind "good".
TEST_FILTERS = {"ratings": ("g", "s"), "exclude_tags": ("comic",), "single_character": True}


# ------------------------------------------------------------------------------------------------------------ images


def _image_bytes(seed: int, size: tuple[int, int], fmt: str) -> bytes:
    """A small, decodable picture that differs per seed (so md5s differ)."""
    im = Image.new("RGB", size, ((seed * 67) % 256, (seed * 131) % 256, (seed * 29) % 256))
    ImageDraw.Draw(im).rectangle((seed % 5, seed % 3, size[0] // 2, size[1] // 2), fill=(255, 255 - seed % 200, 0))
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# ------------------------------------------------------------------------------------------------------------- posts


@dataclass
class FakePost:
    """One post. URLs are stored as (host role, path) and rendered with the live ports on each response."""

    id: int
    kind: str  # good | rating | excluded | multi | deleted | dup | other_host | bad_ext | html | mismatch
    characters: tuple[str, ...]
    artists: tuple[str, ...]
    rating: str
    score: int
    original: bytes = b""  # served at file_url
    original_ext: str = "png"  # the file_ext field (the bad_ext post lies here)
    original_type: str = "image/png"
    sample: bytes = b""  # served at large_file_url (same as original when large == original)
    sample_ext: str = "jpg"
    sample_type: str = "image/jpeg"
    md5: str = ""  # the API's md5 field: md5 of the original
    size: tuple[int, int] = (0, 0)  # the API's image_width/height (of the original)
    general_tags: tuple[str, ...] = ()
    host: str = "cdn"  # cdn | api | other: where file_url and large_file_url point
    same_large: bool = False  # large_file_url == file_url (Danbooru does this for small JPEG originals)
    url_tag: str = ""  # file name prefix; lets the duplicate's URLs differ from its twin's

    @property
    def original_path(self) -> str:
        return f"/data/original/{self.url_tag}{self.md5}.{self.original_url_ext}"

    @property
    def original_url_ext(self) -> str:
        # The bad_ext post lies in file_ext only; its URL still ends in .png.
        return self.original_ext if self.original_ext.isalnum() else "png"

    @property
    def sample_path(self) -> str:
        sample = f"/data/sample/sample-{self.url_tag}{self.md5}.{self.sample_ext}"
        return self.original_path if self.same_large else sample

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.original_path, self.sample_path)))

    @property
    def tags(self) -> tuple[str, ...]:
        return self.characters + self.artists + self.general_tags


def _make_posts() -> list[FakePost]:
    """The fixed post table (ids descending = newest first, as the API returns them)."""
    miku, madoka, saber, remilia = "hatsune_miku", "kaname_madoka", "saber_(fate)", "remilia_scarlet"
    # (id, kind, characters, artists, rating, general tags)
    table = [
        (140, "good", (miku,), ("artist_a",), "g", ()),
        (139, "good", (madoka,), ("artist_b",), "s", ()),
        (138, "bad_ext", (miku,), ("artist_c",), "g", ()),
        (137, "good", (miku,), ("artist_b", "artist_c"), "s", ()),
        (136, "rating", (miku,), ("artist_a",), "q", ()),
        (135, "good", (saber,), ("artist_d",), "g", ()),
        (134, "multi", (miku, madoka), ("artist_a",), "g", ()),
        (133, "good", (madoka,), ("artist_c",), "g", ()),
        (132, "html", (madoka,), ("artist_a",), "g", ()),
        (131, "good", (miku,), (), "g", ()),  # no artist: group falls back to post-131
        (130, "excluded", (miku,), ("artist_d",), "g", ("comic",)),
        (129, "deleted", (miku,), ("artist_a",), "s", ()),
        (128, "good", (saber,), ("artist_a",), "s", ()),
        (127, "other_host", (saber,), ("artist_b",), "g", ()),
        (126, "good", (miku,), ("artist_c",), "g", ("1girl",)),
        (125, "dup", (madoka,), ("artist_d",), "g", ()),  # same file as 139
        (124, "rating", (madoka,), ("artist_b",), "e", ()),
        (123, "good", (miku,), ("artist_d",), "s", ()),
        (122, "mismatch", (saber,), ("artist_c",), "g", ()),
        (121, "good", (madoka,), ("artist_a",), "g", ()),
        (120, "good", (saber,), ("artist_b",), "g", ()),
        (119, "good", (miku,), ("artist_a",), "g", ()),
        (118, "good", (remilia,), ("artist_e",), "g", ()),
    ]
    posts = []
    for pid, kind, chars, artists, rating, general in table:
        size = (24 + (pid % 7) * 4, 20 + (pid % 5) * 4)
        p = FakePost(pid, kind, chars, artists, rating, score=(pid * 7) % 50 - 5, size=size, general_tags=general)
        if pid % 3 == 0:  # a JPEG original, small enough that Danbooru serves it as its own large file
            p.original, p.original_ext, p.original_type = _image_bytes(pid, size, "JPEG"), "jpg", "image/jpeg"
            p.same_large = True
        else:  # a PNG original with a half-size JPEG (or WebP) sample: other extension, bytes and md5
            p.original = _image_bytes(pid, size, "PNG")
            p.sample_ext, p.sample_type = ("webp", "image/webp") if pid % 4 == 0 else ("jpg", "image/jpeg")
            half = (size[0] // 2, size[1] // 2)
            p.sample = _image_bytes(pid, half, "WEBP" if p.sample_ext == "webp" else "JPEG")
        p.md5 = _md5(p.original)
        posts.append(p)
    by_id = {p.id: p for p in posts}
    for p in posts:
        if p.same_large:
            p.sample, p.sample_ext, p.sample_type = p.original, p.original_ext, p.original_type
        if p.kind == "dup":
            src = by_id[139]
            p.original, p.sample, p.md5, p.size = src.original, src.sample, src.md5, src.size
            p.original_ext, p.sample_ext, p.same_large = src.original_ext, src.sample_ext, src.same_large
            p.original_type, p.sample_type = src.original_type, src.sample_type
            p.url_tag = "copy-"  # its own URLs, so tests can tell whether the copy was fetched
        elif p.kind == "other_host":
            p.host = "other"
        elif p.kind == "bad_ext":
            p.original_ext = "../../x"
        elif p.kind == "html":  # an error page behind an image URL
            p.original = p.sample = b"<!doctype html><html><body>Not found</body></html>"
            p.original_ext = p.sample_ext = "jpg"
            p.original_type = p.sample_type = "text/html; charset=utf-8"
            p.same_large = True
        elif p.kind == "mismatch":  # bytes differ from the md5 the API gives; its sample is garbage "JPEG"
            p.original = _image_bytes(999, p.size, "PNG")
            p.sample = b"\xff\xd8\xff\xe0 this is not really a jpeg" * 4
        elif p.id in (140, 121):
            p.host = "api"  # some files live on the API host itself
    return posts


POSTS: list[FakePost] = _make_posts()


# ------------------------------------------------------------------------------------------------------------ server


@dataclass
class Fault:
    match: str  # substring of the unquoted request target
    kind: str  # one of FAULT_KINDS
    times: int  # fail this many matching requests, then behave
    retry_after: float = 1.0  # 429 / 503 header value
    delay: float = 1.0  # timeout: sleep this long before answering


@dataclass
class LoggedRequest:
    start: float
    host: str  # host name the client used (Host header, without port)
    target: str  # unquoted path + query
    path: str  # unquoted path only
    query: dict[str, str]
    auth: str | None  # the raw Authorization header
    status: int = 0
    end: float = 0.0
    fault: str | None = None


@dataclass
class _State:
    posts: list[FakePost]
    lock: threading.Lock = field(default_factory=threading.Lock)
    log: list[LoggedRequest] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    served: Counter = field(default_factory=Counter)  # complete, fault-free 200 responses per path
    in_flight: int = 0
    max_in_flight: int = 0
    image_delay: float = 0.0
    auth: tuple[str, str] | None = None  # (login, api_key) the API endpoints demand when set
    ports: dict[str, int] = field(default_factory=dict)


class FakeDanbooru:
    """The fake API, started in background threads. Use as a context manager or call start()/stop()."""

    def __init__(self, posts: list[FakePost] | None = None, image_delay: float = 0.0) -> None:
        self.state = _State(posts=list(POSTS if posts is None else posts), image_delay=image_delay)
        self._servers: list[ThreadingHTTPServer] = []

    # -- life cycle
    def start(self) -> FakeDanbooru:
        for role, addr in (("api", API_HOST), ("other", OTHER_HOST)):
            server = _Server((addr, 0), _Handler)
            server.state = self.state
            self.state.ports[role] = server.server_address[1]
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FakeDanbooru:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what tests configure
    @property
    def port(self) -> int:
        return self.state.ports["api"]

    @property
    def base_url(self) -> str:
        return f"http://{API_HOST}:{self.port}"

    @property
    def cdn_hosts(self) -> tuple[str, ...]:
        return (CDN_HOST,)

    def inject(self, match: str, kind: str, times: int = 1, **kw) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {FAULT_KINDS}")
        with self.state.lock:
            self.state.faults.append(Fault(match, kind, times, **kw))

    def clear_faults(self) -> None:
        with self.state.lock:
            self.state.faults.clear()

    def require_auth(self, login: str, api_key: str) -> None:
        self.state.auth = (login, api_key)

    def set_image_delay(self, seconds: float) -> None:
        self.state.image_delay = seconds

    def reset_log(self) -> None:
        with self.state.lock:
            self.state.log.clear()
            self.state.served.clear()
            self.state.max_in_flight = 0

    # -- what tests inspect
    @property
    def log(self) -> list[LoggedRequest]:
        with self.state.lock:
            return list(self.state.log)

    @property
    def max_in_flight(self) -> int:
        return self.state.max_in_flight

    def hits(self, path: str) -> int:
        """Requests for this path (any host, any outcome)."""
        return sum(r.path == path for r in self.log)

    def served(self, path: str) -> int:
        """Complete, fault-free 200 responses for this path: how often the file was really downloaded."""
        with self.state.lock:
            return self.state.served[path]

    def post(self, post_id: int) -> FakePost:
        return next(p for p in self.state.posts if p.id == post_id)

    def url(self, role: str, path: str) -> str:
        host = {"api": API_HOST, "cdn": CDN_HOST, "other": OTHER_HOST}[role]
        return f"http://{host}:{self.state.ports['other' if role == 'other' else 'api']}{path}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a handler sleeping in a timeout fault must not hold up stop()
    state: _State

    def handle_error(self, request, client_address) -> None:
        pass  # clients that time out or give up close their socket mid-answer; that is the point of the faults


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real API (the crawler pools connections)
    server: _Server

    def log_message(self, *args) -> None:  # quiet: tests read the structured log instead
        pass

    # -- plumbing
    @property
    def state(self) -> _State:
        return self.server.state

    def do_GET(self) -> None:
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        req = LoggedRequest(
            start=time.monotonic(),
            host=(self.headers.get("Host") or "").rsplit(":", 1)[0],
            target=unquote(self.path),
            path=unquote(split.path),
            query=query,
            auth=self.headers.get("Authorization"),
        )
        with self.state.lock:
            self.state.log.append(req)
            self.state.in_flight += 1
            self.state.max_in_flight = max(self.state.max_in_flight, self.state.in_flight)
            fault = self._take_fault(req.target)
        try:
            req.fault = fault.kind if fault else None
            if fault:
                req.status = self._fault(fault)
            else:
                req.status = self._route(req)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            req.end = time.monotonic()
            with self.state.lock:
                self.state.in_flight -= 1

    def _take_fault(self, target: str) -> Fault | None:
        for fault in self.state.faults:
            if fault.times > 0 and fault.match in target:
                fault.times -= 1
                return fault
        return None

    def _send(
        self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None, length: int | None = None
    ) -> int:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        return status

    def _json(self, obj, status: int = 200) -> int:
        return self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8")

    # -- faults
    def _fault(self, fault: Fault) -> int:
        if fault.kind == "429":
            return self._send(
                429,
                b'{"success":false,"message":"Too many requests"}',
                "application/json",
                {"Retry-After": f"{fault.retry_after:g}"},
            )
        if fault.kind in ("500", "503"):
            headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.kind == "503" else {}
            return self._send(int(fault.kind), b"<html>upstream error</html>", "text/html", headers)
        if fault.kind == "timeout":
            time.sleep(fault.delay)  # the client has given up long before this
            self.close_connection = True
            return self._send(200, b"[]", "application/json")
        if fault.kind == "truncate":  # promise more bytes than are sent, then hang up
            self.close_connection = True
            body, ctype = self._file_for(unquote(urlsplit(self.path).path))
            return self._send(200, body[: len(body) // 2], ctype, length=len(body) + 100)
        if fault.kind == "corrupt":  # every byte arrives, one of them wrong: only a checksum can tell
            body, ctype = self._file_for(unquote(urlsplit(self.path).path))
            mid = len(body) // 2
            return self._send(200, body[:mid] + bytes([body[mid] ^ 0xFF]) + body[mid + 1 :], ctype)
        # badjson: a 200 whose body is not JSON (what a proxy error page looks like to the client)
        return self._send(200, b'[{"id": 1, "md5": "abc", ', "application/json")

    def _file_for(self, path: str) -> tuple[bytes, str]:
        """(body, Content-Type) of an image path; a JSON-looking filler for anything else."""
        for p in self.state.posts:
            if path == p.original_path:
                return p.original, p.original_type
            if path == p.sample_path:
                return p.sample, p.sample_type
        return b"[" + b" " * 1000 + b"]", "application/json"

    # -- endpoints
    def _route(self, req: LoggedRequest) -> int:
        if req.path.startswith("/data/"):
            return self._image(req.path)
        if req.path in ("/posts.json", "/tags.json"):
            if not self._authorised(req.auth):
                return self._json({"success": False, "message": "SessionLoader::AuthenticationFailure"}, 401)
            return self._posts(req.query) if req.path == "/posts.json" else self._tags(req.query)
        return self._json({"success": False, "message": "not found"}, 404)

    def _authorised(self, header: str | None) -> bool:
        if self.state.auth is None:
            return True
        expected = "Basic " + base64.b64encode(":".join(self.state.auth).encode()).decode()
        return header == expected

    def _image(self, path: str) -> int:
        for p in self.state.posts:
            for file_path, body, ctype in (
                (p.original_path, p.original, p.original_type),
                (p.sample_path, p.sample, p.sample_type),
            ):
                if path == file_path:
                    if self.state.image_delay:
                        time.sleep(self.state.image_delay)
                    status = self._send(200, body, ctype)
                    with self.state.lock:
                        self.state.served[path] += 1
                    return status
        return self._send(404, b"not found", "text/plain")

    def _posts(self, q: dict[str, str]) -> int:
        limit = min(int(q.get("limit") or 20), 200)
        posts = sorted((p for p in self.state.posts if _matches(p, q.get("tags", ""))), key=lambda p: -p.id)
        page = q.get("page") or "1"
        if page.startswith("b"):
            posts = [p for p in posts if p.id < int(page[1:])][:limit]
        elif page.startswith("a"):
            posts = [p for p in posts if p.id > int(page[1:])][-limit:]
        elif page.isdigit() and 1 <= int(page) <= 1000:
            posts = posts[(int(page) - 1) * limit : int(page) * limit]
        else:
            return self._json({"success": False, "message": "You cannot go beyond page 1000."}, 410)
        return self._json([self._render(p) for p in posts])

    def _tags(self, q: dict[str, str]) -> int:
        counts = Counter(t for p in self.state.posts for t in p.characters)
        if q.get("search[category]") not in (None, "4"):
            counts = Counter()  # only character tags exist here
        names = sorted(counts, key=(lambda t: (-counts[t], t)) if q.get("search[order]") == "count" else None)
        limit, page = min(int(q.get("limit") or 20), 1000), int(q.get("page") or 1)
        rows = [{"id": i, "name": n, "post_count": counts[n], "category": 4} for i, n in enumerate(names)]
        return self._json(rows[(page - 1) * limit : page * limit])

    def _render(self, p: FakePost) -> dict:
        d = {
            "id": p.id,
            "rating": p.rating,
            "score": p.score,
            "tag_string": " ".join(sorted(p.tags)),
            "tag_string_character": " ".join(p.characters),
            "tag_string_artist": " ".join(p.artists),
            "tag_string_general": " ".join(p.general_tags),
            "image_width": p.size[0],
            "image_height": p.size[1],
            "file_ext": p.original_ext,
            "file_size": len(p.original),
            "is_deleted": p.kind == "deleted",
        }
        if p.kind != "deleted":  # Danbooru hides the file of deleted/banned posts
            base = _base(self.state, p.host)
            d.update(md5=p.md5, file_url=base + p.original_path, large_file_url=base + p.sample_path)
        return d


def _base(state: _State, role: str) -> str:
    host = {"api": API_HOST, "cdn": CDN_HOST, "other": OTHER_HOST}[role]
    return f"http://{host}:{state.ports['other' if role == 'other' else 'api']}"


def _matches(p: FakePost, tags: str) -> bool:
    for tag in tags.split():
        if tag.startswith("rating:"):
            ok = p.rating in tag.removeprefix("rating:").split(",")
        elif tag.startswith("-"):
            ok = tag[1:] not in p.tags
        else:
            ok = tag in p.tags
        if not ok:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Serve the fake Danbooru API on 127.0.0.1 until interrupted.")
    ap.add_argument("--port-file", type=Path, required=True, help="the API port is written here once listening")
    ap.add_argument("--image-delay", type=float, default=0.0, help="seconds to wait before each image answer")
    args = ap.parse_args(argv)
    with FakeDanbooru(image_delay=args.image_delay) as server:
        tmp = args.port_file.with_name(args.port_file.name + ".tmp")
        tmp.write_text(f"{server.port}\n")
        os.replace(tmp, args.port_file)  # readers never see a half-written port
        print(f"fake Danbooru at {server.base_url} (CDN host {CDN_HOST}, forbidden host {OTHER_HOST})", flush=True)
        done = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: done.set())  # `kill PID` stops it cleanly, like Ctrl-C
        try:
            done.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
