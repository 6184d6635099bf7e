"""The `danbooru` acquisition source: a polite, resumable crawler for the Danbooru JSON API.

Flow: character tags (given, or the top N from /tags.json) -> /posts.json pages per character, newest first (page 1,
then the `b<id>` cursor) -> filters on the metadata (rating, excluded tags, exactly one character) -> checks that need
no download (a file URL, an allowed host, an allowed extension, an md5 not kept yet) -> download (concurrent,
rate-limited, retried) -> checks on the bytes (Content-Type, size, md5 of originals, decodes as an image) -> journal
-> manifest.

Determinism: posts are committed in API order, batch by batch, so what is kept (which of two equal files wins, where
max_posts_per_character stops) does not depend on download timing.

Resuming: each finished download (a kept file or rejected bytes) is one fsynced line of out/journal.jsonl. A re-run
asks the API again (cheap) but takes finished posts from the journal instead of downloading them, so a crawl killed at
any moment and run again gives the manifest an uninterrupted crawl gives. Downloads that fail after their retry budget
are not journaled: the next run tries them again.

Credentials (optional; anonymous crawling works with lower limits): DANBOORU_LOGIN / DANBOORU_API_KEY, or `login=`
and `api_key=` lines in acquire.danbooru.credentials_file. They travel only as an HTTP basic-auth header to the API
host, never in a URL, so no log line, exception, journal or manifest can contain them.
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, NoReturn, TypeVar
from urllib.parse import urlencode, urlsplit

import polars as pl
import urllib3
from PIL import Image
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from pipeline.config import DanbooruSource
from pipeline.data import manifest
from pipeline.io import atomic_path, write_parquet
from pipeline.progress import progress

log = logging.getLogger(__name__)

SOURCE = "danbooru"
IMAGES = "images"
JOURNAL = "journal.jsonl"
REJECTED = "rejected.parquet"
ENV_LOGIN, ENV_API_KEY = "DANBOORU_LOGIN", "DANBOORU_API_KEY"
USER_AGENT = "anime-fgvc-pipeline/0.1 (danbooru acquire source)"  # Danbooru asks crawlers for a real User-Agent
# Saved names use these strings (ours), never text from the server: a `file_ext` of `../../x` cannot leave out/.
EXTENSIONS = {e: e for e in ("jpg", "jpeg", "png", "gif", "webp", "bmp")}
EXTRA_SCHEMA: dict[str, pl.DataType] = {"post_id": pl.Int64, "character": pl.String, "artist": pl.String,
                                        "rating": pl.String, "score": pl.Int64, "source_url": pl.String}
REJECTED_SCHEMA: dict[str, pl.DataType] = {"post_id": pl.Int64, "reason": pl.String, "detail": pl.String}
# What a broken connection looks like, whether it breaks before the answer or while its body streams in.
NETWORK_ERRORS = (urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError, TimeoutError)

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------------------ errors

class FetchError(RuntimeError):
    """A request failed for good (a refused status, or the retry budget spent). Names the URL, never credentials."""


class CrawlError(ConnectionError):
    """The crawl stopped because an API request failed; what finished is in the journal, a re-run resumes."""


class _Retryable(Exception):
    """A transient failure (429, 5xx, timeout, reset, truncated or unparsable body): worth another attempt."""

    def __init__(self, what: str, retry_after: float | None = None) -> None:
        super().__init__(what)
        self.retry_after = retry_after


class _Rejected(Exception):
    """The post or its bytes are not something we keep; `reason` is the short key the counts use."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ------------------------------------------------------------------------------------------------------- validation

def check_config(cfg: DanbooruSource) -> None:
    """What the params model cannot check by type: tag syntax, something to crawl (it checks the URL)."""
    bad = [c for c in cfg.characters if not c or any(ch.isspace() for ch in c)]
    if bad:
        raise ValueError(f"acquire.danbooru.characters: {bad} are not single tags (Danbooru tags use underscores)")
    if not cfg.characters and cfg.top_characters == 0:
        raise ValueError("acquire.danbooru.characters: empty while acquire.danbooru.top_characters is 0; "
                         "name the characters to crawl or set top_characters")
    bad = [h for h in cfg.cdn_hosts if not h or any(c in h for c in "/:@ ")]
    if bad:
        raise ValueError(f"acquire.danbooru.cdn_hosts: {bad} are not bare host names (e.g. cdn.donmai.us)")


# ------------------------------------------------------------------------------------------------------- credentials

@dataclass(frozen=True)
class Credentials:
    login: str
    api_key: str = field(repr=False)  # repr() shows the login only, so a stray print cannot leak the key

    def headers(self) -> dict[str, str]:
        return urllib3.make_headers(basic_auth=f"{self.login}:{self.api_key}")


def load_credentials(cfg: DanbooruSource, root: Path) -> Credentials | None:
    """Environment variables win over the credentials file (relative to root); neither present: anonymous."""
    from_file = _read_credentials_file(root / cfg.credentials_file)
    login = os.environ.get(ENV_LOGIN) or from_file.get("login")
    api_key = os.environ.get(ENV_API_KEY) or from_file.get("api_key")
    if not login and not api_key:
        return None
    if not (login and api_key):
        missing = f"{ENV_LOGIN} (or login=)" if api_key else f"{ENV_API_KEY} (or api_key=)"
        raise ValueError(f"danbooru credentials: {missing} is missing; set both or neither "
                         f"(acquire.danbooru.credentials_file: {cfg.credentials_file})")
    return Credentials(login, api_key)


def _read_credentials_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    values = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or key.strip() not in ("login", "api_key"):
            # The line may hold the secret: name its number, never its text.
            raise ValueError(f"acquire.danbooru.credentials_file: {path} line {n} is not `login=...` or `api_key=...`")
        values[key.strip()] = value.strip()
    return values


def _check_transport(base_url: str, credentials: Credentials | None) -> None:
    """Basic auth over plain http is readable by anyone on the path; only loopback (tests, local mirrors) may."""
    parts = urlsplit(base_url)
    if credentials is None or parts.scheme == "https":
        return
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"acquire.danbooru.base_url: refusing to send credentials over plain http to {host}; "
                         "use https")


# ---------------------------------------------------------------------------------------------------------- politeness

class RateLimiter:
    """At most `per_second` request starts per second across all threads: each caller takes the next free slot.

    A bucket of one token, so no bursts: the point is to be gentle with a shared server. `pause` pushes every slot
    back, so a 429 seen by one thread holds all of them.
    """

    def __init__(self, per_second: float) -> None:
        self._interval = 1.0 / per_second
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self._interval
        if slot > now:
            time.sleep(slot - now)

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._next = max(self._next, time.monotonic() + seconds)


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (a number or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# -------------------------------------------------------------------------------------------------------------- HTTP

class Client:
    """GET with the crawl's manners: shared rate limit, at most max_connections in flight, timeouts, retries.

    Retries are one tenacity loop around a whole attempt (request + body) rather than urllib3's Retry: urllib3 cannot
    retry a body that breaks off while streaming, its first retry does not back off, and its sleeps would bypass the
    shared limiter.
    """

    def __init__(self, cfg: DanbooruSource, credentials: Credentials | None) -> None:
        self.cfg = cfg
        self.api_origin = _origin(cfg.base_url)
        self.allowed_hosts = {self.api_origin[1], *(h.lower() for h in cfg.cdn_hosts)}
        self._auth = credentials.headers() if credentials else {}
        self.limiter = RateLimiter(cfg.requests_per_second)
        # PoolManager's maxsize is per host; the semaphore is what bounds connections over all hosts together.
        self._slots = threading.BoundedSemaphore(cfg.max_connections)
        # The read timeout bounds each wait for data (a stalled server), not a whole transfer.
        self._pool = urllib3.PoolManager(
            num_pools=8, maxsize=cfg.max_connections, headers={"User-Agent": USER_AGENT},
            timeout=urllib3.Timeout(connect=cfg.timeout_s, read=cfg.timeout_s), retries=False)
        self._backoff = wait_exponential_jitter(multiplier=cfg.backoff_s, jitter=cfg.backoff_s,
                                                max=max(60.0, cfg.backoff_s))

    def host_problem(self, url: str) -> str | None:
        """Why this URL may not be downloaded (None: it may)."""
        try:
            parts = urlsplit(url)
            parts.port
        except ValueError:
            return "unparsable URL"
        if parts.scheme not in ("http", "https"):
            return f"scheme {parts.scheme!r} is not http(s)"
        if parts.username or parts.password:
            return "URL carries a login"
        host = (parts.hostname or "").lower()
        if host not in self.allowed_hosts:
            return f"host {host!r} is neither the API host nor in acquire.danbooru.cdn_hosts"
        return None

    def get_json(self, url: str, params: dict[str, Any]) -> list:
        return self.get(f"{url}?{urlencode(params)}", _read_json_list)

    def get(self, url: str, consume: Callable[[urllib3.BaseHTTPResponse], T]) -> T:
        """GET `url` and hand the 200 response to `consume`; raises FetchError once retrying is pointless."""
        retrying = Retrying(stop=stop_after_attempt(self.cfg.max_retries + 1), wait=self._wait,
                            retry=retry_if_exception_type(_Retryable),
                            before_sleep=lambda state: self._note_retry(url, state),
                            retry_error_callback=lambda state: self._give_up(url, state))
        return retrying(self._attempt, url, consume)

    def _attempt(self, url: str, consume: Callable[[urllib3.BaseHTTPResponse], T]) -> T:
        with self._slots:
            self.limiter.wait()  # inside the slot: a thread that waited for a slot must still take a rate slot
            # Credentials go to the API origin only: CDNs do not need them and must not see them.
            headers = self._auth if _origin(url) == self.api_origin else {}
            try:
                resp = self._pool.request("GET", url, headers=headers, preload_content=False, redirect=False)
            except NETWORK_ERRORS as exc:
                raise _Retryable(_describe(exc)) from exc
            try:
                self._check_status(url, resp)
                return consume(resp)
            except NETWORK_ERRORS as exc:  # the body broke off: reset, read timeout, fewer bytes than announced
                resp.close()
                raise _Retryable(_describe(exc)) from exc
            except BaseException:
                resp.close()  # a half-read answer must not go back to the pool
                raise
            finally:
                resp.release_conn()

    def _check_status(self, url: str, resp: urllib3.BaseHTTPResponse) -> None:
        if resp.status == 200:
            return
        if resp.status == 429 or resp.status >= 500:
            retry_after = _retry_after(resp.headers.get("Retry-After"))
            if retry_after is not None and retry_after > self.cfg.max_retry_after_s:
                raise FetchError(f"GET {url}: HTTP {resp.status} asks to retry after {retry_after:.0f} s, more than "
                                 f"acquire.danbooru.max_retry_after_s={self.cfg.max_retry_after_s:g}: run again "
                                 "later (finished posts are kept)")
            if retry_after is not None:
                self.limiter.pause(retry_after)
            raise _Retryable(f"HTTP {resp.status}", retry_after)
        hint = {401: " (check the Danbooru login and API key)", 403: " (forbidden: check the credentials)"}
        redirect = " (redirects are not followed: they could lead to any host)" if 300 <= resp.status < 400 else ""
        raise FetchError(f"GET {url} failed: HTTP {resp.status}{hint.get(resp.status, '')}{redirect}")

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return exc.retry_after  # the server said how long; the limiter holds the other threads as long
        return self._backoff(state)

    def _note_retry(self, url: str, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.info("danbooru: GET %s: %s; attempt %d in %.2fs", url, exc, state.attempt_number + 1, wait)

    def _give_up(self, url: str, state: RetryCallState) -> NoReturn:
        exc = state.outcome.exception() if state.outcome else None
        raise FetchError(f"GET {url} failed after {state.attempt_number} attempts "
                         f"(acquire.danbooru.max_retries={self.cfg.max_retries}); last: {exc}") from exc


def _read_json_list(resp: urllib3.BaseHTTPResponse) -> list:
    body = resp.read()
    try:
        data = json.loads(body)
    except ValueError as exc:  # e.g. a proxy's HTML error page with status 200
        raise _Retryable(f"invalid JSON ({len(body)} bytes): {exc}") from exc
    if not isinstance(data, list):
        raise _Retryable(f"expected a JSON list, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------------------------- posts

def _str(d: dict, key: str) -> str:
    v = d.get(key)
    return v if isinstance(v, str) else ""


def _int(d: dict, key: str) -> int | None:
    v = d.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


@dataclass(frozen=True)
class Post:
    """The fields of an API post the crawler uses, type-checked (the API's JSON is untrusted input)."""

    id: int
    md5: str
    file_url: str
    large_file_url: str
    file_ext: str
    file_size: int | None
    characters: tuple[str, ...]
    artists: tuple[str, ...]
    tags: frozenset[str]
    rating: str
    score: int | None

    @classmethod
    def parse(cls, d: Any) -> "Post | None":
        """None when the entry has no usable id (nothing can be named or saved after it)."""
        if not isinstance(d, dict) or (_int(d, "id") or 0) <= 0:
            return None
        return cls(id=d["id"], md5=_str(d, "md5").lower(), file_url=_str(d, "file_url"),
                   large_file_url=_str(d, "large_file_url"), file_ext=_str(d, "file_ext").lower(),
                   file_size=_int(d, "file_size"), characters=tuple(_str(d, "tag_string_character").split()),
                   artists=tuple(_str(d, "tag_string_artist").split()),
                   tags=frozenset(_str(d, "tag_string").split()), rating=_str(d, "rating"), score=_int(d, "score"))


def skip_reason(post: Post, cfg: DanbooruSource) -> str | None:
    """Filters on metadata alone (no download): None keeps the post."""
    if post.rating not in cfg.ratings:
        return "rating"
    if post.tags & set(cfg.exclude_tags):
        return "excluded_tag"
    if cfg.single_character and len(post.characters) != 1:  # DAF:re: exactly one character tag
        return "multi_character"
    if not (post.file_url if cfg.file == "original" else post.large_file_url or post.file_url):
        return "no_file"  # deleted or banned: the API hides the file
    return None


@dataclass(frozen=True)
class Download:
    """One file to fetch and how to check it."""

    post_id: int
    url: str
    ext: str
    md5: str | None  # expected md5: originals only (a large file is a re-encode with its own md5 and size)
    size: int | None

    @property
    def path(self) -> str:
        return f"{IMAGES}/{self.post_id}.{self.ext}"


def _extension(url: str, file_ext: str, original: bool) -> str | None:
    """The allow-listed extension for the saved file, or None. The URL's suffix names the file type (a large file
    may be .jpg/.webp for a .png original); file_ext must be an image type too, and match an original's URL."""
    suffix = PurePosixPath(urlsplit(url).path).suffix.lower().removeprefix(".")
    if suffix not in EXTENSIONS or file_ext not in EXTENSIONS or (original and file_ext != suffix):
        return None
    return EXTENSIONS[suffix]


def plan_download(post: Post, cfg: DanbooruSource, client: Client, max_bytes: int) -> Download:
    """What to fetch for a post that passed the filters; raises _Rejected for what needs no download to refuse."""
    original = cfg.file == "original" or not post.large_file_url
    url = post.file_url if original else post.large_file_url
    problem = client.host_problem(url)
    if problem:
        raise _Rejected("bad_host", f"{problem}: {url[:200]}")
    ext = _extension(url, post.file_ext, original)
    if ext is None:
        raise _Rejected("bad_ext", f"file_ext {post.file_ext[:40]!r}, URL {url[:200]}")
    if original and post.file_size is not None and post.file_size > max_bytes:
        raise _Rejected("too_large", f"{post.file_size} bytes > acquire.danbooru.max_file_mb")
    return Download(post.id, url, ext, post.md5 if original and post.md5 else None,
                    post.file_size if original else None)


def _save_image(resp: urllib3.BaseHTTPResponse, dest: Path, dl: Download, max_bytes: int) -> dict[str, Any]:
    """Stream an image answer to `dest` (atomically: complete or absent, even under SIGKILL) and check it."""
    ctype = resp.headers.get("Content-Type", "")
    if not ctype.lower().startswith("image/"):
        raise _Rejected("not_image", f"Content-Type {ctype[:60]!r}")
    declared = resp.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _Rejected("too_large", f"{declared} bytes > acquire.danbooru.max_file_mb")
    digest, n = hashlib.md5(), 0
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            for chunk in resp.stream(1 << 16):
                n += len(chunk)
                if n > max_bytes:
                    raise _Rejected("too_large", f"more than {max_bytes} bytes > acquire.danbooru.max_file_mb")
                digest.update(chunk)
                f.write(chunk)
        md5 = digest.hexdigest()
        if dl.md5 is not None and md5 != dl.md5:
            raise _Rejected("md5_mismatch", f"got {md5}, the API says {dl.md5}")
        if dl.size is not None and n != dl.size:
            raise _Rejected("size_mismatch", f"got {n} bytes, the API says {dl.size}")
        width, height = _decoded_size(tmp)
    return {"path": dl.path, "md5": md5, "bytes": n, "width": width, "height": height}


def _decoded_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() leaves the image unusable; reopen for the header
            return im.size
    except Exception as exc:  # Pillow raises many types for bad data (and DecompressionBombError)
        raise _Rejected("not_image", f"does not decode as an image ({type(exc).__name__})") from None


# ----------------------------------------------------------------------------------------------------------- journal

class Journal:
    """Append-only JSON lines of finished downloads, keyed by (post_id, file kind).

    Each line is flushed and fsynced before its post counts as done, so after a SIGKILL every line is complete except
    perhaps the last; loading cuts that torn tail off (appending after it would glue two records together).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._records = self._load()
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8")

    def _load(self) -> dict[tuple[int, str], dict]:
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            os.truncate(self.path, end)
        records = {}
        for n, line in enumerate(data[:end].splitlines(), 1):
            try:
                rec = json.loads(line)
                records[(int(rec["post_id"]), str(rec["file"]))] = rec
            except (ValueError, KeyError, TypeError):
                log.warning("danbooru: %s line %d is unreadable and ignored (that post is fetched again)", self.path, n)
        return records

    def get(self, post_id: int, file: str) -> dict | None:
        with self._lock:
            return self._records.get((post_id, file))

    def add(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._records[(record["post_id"], record["file"])] = record

    def close(self) -> None:
        self._file.close()


# ------------------------------------------------------------------------------------------------------------- crawl

def _by_reason(counts: Counter) -> str:
    """`3 (bad_ext 1, not_image 2)`."""
    detail = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))
    return f"{sum(counts.values())}" + (f" ({detail})" if detail else "")


@dataclass
class Tally:
    """What happened to the posts of this run: kept, rejected (rejected.parquet), skipped by a filter, failed."""

    kept: int = 0
    failed: int = 0
    skipped: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)

    def summary(self, n_classes: int) -> str:
        return (f"danbooru: kept {self.kept} posts of {n_classes} characters; rejected {_by_reason(self.rejected)}; "
                f"skipped {_by_reason(self.skipped)}; failed {self.failed}")


class _Crawl:
    """One crawl into `out`: pages -> candidates -> batches of downloads -> commits in API order."""

    def __init__(self, cfg: DanbooruSource, out: Path, client: Client, journal: Journal) -> None:
        self.cfg, self.out, self.client, self.journal = cfg, out, client, journal
        self.max_bytes = int(cfg.max_file_mb * 1024 * 1024)
        self.rows: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []
        self.kept_md5: dict[str, int] = {}  # md5 (API's and saved file's) -> the post that kept it
        self.seen: set[int] = set()  # every post handled in this run (a multi-character post comes up twice)
        self.tally = Tally()
        self.bar = progress(desc="danbooru", unit="post")
        self.pool = ThreadPoolExecutor(cfg.max_connections, thread_name_prefix="danbooru")

    def __enter__(self) -> "_Crawl":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.bar.close()

    # -- API
    def _api(self, path: str, params: dict[str, Any]) -> list:
        try:
            return self.client.get_json(self.cfg.base_url.rstrip("/") + path, params)
        except FetchError as exc:
            raise CrawlError(f"danbooru: crawl stopped: {exc}. Finished posts are in {self.journal.path}; "
                             "run again to resume") from exc

    def top_characters(self, n: int) -> list[str]:
        """The n character tags with most posts (/tags.json, category 4 = character)."""
        limit, names, page = min(n, 1000), [], 1
        while len(names) < n:
            rows = self._api("/tags.json", {"search[category]": 4, "search[order]": "count", "limit": limit,
                                            "page": page})
            names += [r["name"] for r in rows if isinstance(r, dict) and isinstance(r.get("name"), str)
                      and r["name"] and not any(c.isspace() for c in r["name"])]
            if len(rows) < limit:
                break
            page += 1
        if not names:
            raise CrawlError(f"danbooru: {self.cfg.base_url}/tags.json listed no character tags")
        return names[:n]

    def _pages(self, tag: str) -> Iterator[list]:
        """Newest first: page 1, then `b<lowest id so far>` (Danbooru refuses numbered pages past 1000)."""
        page = "1"
        while True:
            posts = self._api("/posts.json", {"tags": tag, "limit": self.cfg.page_limit, "page": page})
            ids = [p.id for p in map(Post.parse, posts) if p]
            if not ids:
                return
            yield posts
            page = f"b{min(ids)}"

    # -- per character
    def run(self, characters: list[str]) -> None:
        for character in characters:
            self._crawl_character(character)

    def _crawl_character(self, character: str) -> None:
        wanted, kept = self.cfg.max_posts_per_character, 0
        for page in self._pages(character):
            queue = deque(self._candidates(page))
            while queue and kept < wanted:
                kept += self._run_batch(self._next_batch(queue, wanted - kept), character)
            if kept >= wanted:
                return

    def _candidates(self, page: list) -> list[Post]:
        """The page's posts that pass the metadata filters, in API order; the others are counted as skipped."""
        keep = []
        for entry in page:
            post = Post.parse(entry)
            if post is None:
                reason: str | None = "bad_post"
            else:
                reason = "already_seen" if post.id in self.seen else skip_reason(post, self.cfg)
                self.seen.add(post.id)
            if reason or post is None:
                self.tally.skipped[reason] += 1
                self.bar.update()
            else:
                keep.append(post)
        return keep

    def _next_batch(self, queue: deque[Post], need: int) -> list[tuple[Post, Download]]:
        """Up to `need` downloads. A post whose md5 twin is already in the batch waits for the next batch, so that
        which twin is kept does not depend on which download finishes first."""
        batch: list[tuple[Post, Download]] = []
        md5s: set[str] = set()
        while queue and len(batch) < need:
            post = queue[0]
            if post.md5 and post.md5 in md5s:
                break
            queue.popleft()
            try:
                if post.md5 in self.kept_md5:
                    raise _Rejected("duplicate_md5", f"same md5 as post {self.kept_md5[post.md5]}")
                dl = plan_download(post, self.cfg, self.client, self.max_bytes)
            except _Rejected as r:
                self._reject(post.id, r.reason, r.detail)
                continue
            batch.append((post, dl))
            md5s.add(post.md5)
        return batch

    def _run_batch(self, batch: list[tuple[Post, Download]], character: str) -> int:
        """Fetch what the journal does not have (concurrently), then commit in order. Returns the number kept."""
        pending = [self._from_journal(dl) or self.pool.submit(self._fetch, dl) for _, dl in batch]
        kept = 0
        for (post, dl), outcome in zip(batch, pending):
            kept += self._commit(post, outcome.result() if isinstance(outcome, Future) else outcome, character)
        return kept

    # -- per post
    def _from_journal(self, dl: Download) -> dict | None:
        """A finished earlier outcome for this download, if its file (when kept) is still intact."""
        rec = self.journal.get(dl.post_id, self.cfg.file)
        if rec is None:
            return None
        if rec.get("status") == "rejected" and rec.get("reason"):
            # "Too large" depends on the cap it was judged under: a raised cap deserves a new attempt.
            if rec["reason"] == "too_large" and self.max_bytes > rec.get("max_bytes", 0):
                return None
            return rec
        if rec.get("status") == "ok" and rec.get("path") == dl.path:  # never trust a path we did not compute
            f = self.out / dl.path
            if f.is_file() and f.stat().st_size == rec.get("bytes"):
                return rec
        return None

    def _fetch(self, dl: Download) -> dict:
        """Worker thread: download one file and journal the outcome at once (a kill loses only in-flight posts)."""
        record: dict[str, Any] = {"post_id": dl.post_id, "file": self.cfg.file, "url": dl.url}
        try:
            saved = self.client.get(dl.url, lambda resp: _save_image(resp, self.out / dl.path, dl, self.max_bytes))
        except _Rejected as r:
            record.update(status="rejected", reason=r.reason, detail=r.detail)
            if r.reason == "too_large":
                record["max_bytes"] = self.max_bytes
        except FetchError as exc:
            return {**record, "status": "failed", "detail": str(exc)}  # not journaled: the next run tries again
        else:
            record.update(status="ok", **saved)
        self.journal.add(record)
        return record

    def _commit(self, post: Post, rec: dict, character: str) -> int:
        self.bar.update()
        if rec["status"] == "failed":
            self.tally.failed += 1
            log.warning("danbooru: post %d not downloaded: %s", post.id, rec["detail"])
            return 0
        if rec["status"] == "rejected":
            self._reject(post.id, rec["reason"], rec.get("detail", ""))
            return 0
        twin = self.kept_md5.get(rec["md5"])
        if twin is not None:  # same bytes as a kept post although the API md5s differ
            (self.out / rec["path"]).unlink(missing_ok=True)
            self._reject(post.id, "duplicate_md5", f"same file as post {twin}")
            return 0
        for md5 in {rec["md5"], post.md5} - {""}:
            self.kept_md5[md5] = post.id
        self.rows.append(_manifest_row(post, character, rec))
        self.tally.kept += 1
        self.bar.set_postfix(kept=self.tally.kept, refresh=False)
        return 1

    def _reject(self, post_id: int, reason: str, detail: str) -> None:
        self.rejected.append({"post_id": post_id, "reason": reason, "detail": detail})
        self.tally.rejected[reason] += 1
        self.bar.update()


def _manifest_row(post: Post, character: str, rec: dict) -> dict[str, Any]:
    artist = post.artists[0] if post.artists else None
    return {"image_id": f"danbooru-{post.id}", "path": rec["path"], "class_name": character, "source": SOURCE,
            "group": artist or f"post-{post.id}", "md5": rec["md5"], "width": rec["width"], "height": rec["height"],
            "split": None, "post_id": post.id, "character": character, "artist": artist, "rating": post.rating,
            "score": post.score, "source_url": rec["url"]}


def _manifest(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """Class ids index the sorted kept characters; rows sorted by (character, post_id): deterministic."""
    ids = {name: i for i, name in enumerate(sorted({r["character"] for r in rows}))}
    df = pl.DataFrame([{**r, "class_id": ids[r["character"]]} for r in rows],
                      schema={**manifest.SCHEMA, **EXTRA_SCHEMA})
    return df.sort("character", "post_id")


def _remove_temp_files(*folders: Path) -> None:
    """Leftovers of pipeline.io.atomic_path from a killed run (`.<name>.<random>.tmp`)."""
    for folder in folders:
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def _remove_strays(images: Path, keep: set[str]) -> None:
    """images/ holds exactly the manifest's files: drop rejected duplicates and files of posts no longer crawled."""
    for f in images.iterdir():
        if f.is_file() and f"{IMAGES}/{f.name}" not in keep:
            f.unlink()


def from_danbooru(cfg: DanbooruSource, root: Path, out: Path) -> pl.DataFrame:
    """Crawl into out/ (images/, journal.jsonl, rejected.parquet) and return the manifest (the caller writes it).

    `out` is not emptied: finished posts in its journal are not downloaded again.
    """
    check_config(cfg)
    credentials = load_credentials(cfg, root)
    _check_transport(cfg.base_url, credentials)
    images = out / IMAGES
    images.mkdir(parents=True, exist_ok=True)
    _remove_temp_files(out, images)
    journal = Journal(out / JOURNAL)
    try:
        with _Crawl(cfg, out, Client(cfg, credentials), journal) as crawl:
            characters = sorted(set(cfg.characters)) or crawl.top_characters(cfg.top_characters)
            crawl.run(characters)
    finally:
        journal.close()
    df = _manifest(crawl.rows)
    write_parquet(out / REJECTED, pl.DataFrame(crawl.rejected, schema=REJECTED_SCHEMA).sort("post_id"))
    _remove_strays(images, set(df["path"]))
    print(crawl.tally.summary(df["class_name"].n_unique()))
    return df


# --------------------------------------------------------------------------------------------------------------- CLI

CLI_HELP = (f"crawl the Danbooru JSON API (credentials, optional: {ENV_LOGIN}/{ENV_API_KEY} or the "
            "credentials file; never a flag)")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    """Flags named after acquire.danbooru keys; unset flags keep the params defaults (argparse.SUPPRESS)."""
    def add(flag: str, dest: str, help: str, **kw: Any) -> None:
        p.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=help, **kw)

    add("--base-url", "base_url", "API origin, http(s) (default https://danbooru.donmai.us)", metavar="URL")
    add("--characters", "characters", "character tags to crawl, comma-separated", type=_csv, metavar="A,B,C")
    add("--top-characters", "top_characters", "with no --characters: crawl the N character tags with most posts",
        type=int, metavar="N")
    add("--max-posts", "max_posts_per_character", "stop a character after N kept posts", type=int, metavar="N")
    add("--ratings", "ratings", "keep these ratings (g,s,q,e)", type=_csv, metavar="g,s")
    add("--exclude-tags", "exclude_tags", "drop posts carrying any of these tags", type=_csv, metavar="X,Y")
    add("--allow-multi-character", "single_character", "keep posts tagged with several characters "
        "(default: exactly one, the DAF:re rule)", action="store_false")
    add("--file", "file", "large (large_file_url) or original (file_url)", choices=("large", "original"))
    add("--page-limit", "page_limit", "posts per API page (<= 200)", type=int, metavar="N")
    add("--requests-per-second", "requests_per_second", "request rate over all connections", type=float,
        metavar="R")
    add("--max-connections", "max_connections", "concurrent connections", type=int, metavar="N")
    add("--cdn-hosts", "cdn_hosts", "hosts images may come from besides the API host", type=_csv,
        metavar="H1,H2")
    add("--timeout", "timeout_s", "seconds per request (connect and read)", type=float, metavar="S")
    add("--max-retries", "max_retries", "retries of 429/5xx/timeouts/truncated bodies", type=int, metavar="N")
    add("--max-retry-after", "max_retry_after_s", "a longer Retry-After fails the request instead of waiting",
        type=float, metavar="S")
    add("--backoff", "backoff_s", "first retry wait in seconds (doubles, with jitter)", type=float, metavar="S")
    add("--max-file-mb", "max_file_mb", "skip larger files", type=float, metavar="MB")
    add("--credentials-file", "credentials_file", "login=/api_key= file, relative to the working directory",
        metavar="PATH")


def section_from_cli(args: argparse.Namespace) -> dict[str, Any]:
    """The acquire.danbooru keys given on the command line (the params model validates them)."""
    return {k: getattr(args, k) for k in DanbooruSource.model_fields if hasattr(args, k)}
