"""HTTP for the crawl: credentials, the shared rate limit, and a GET with timeouts and retries.

Credentials travel only as an HTTP basic-auth header to the API host, never in a URL, so no log line, exception,
journal or manifest can contain them.
"""

from __future__ import annotations

import email.utils
import http.client
import ipaddress
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlencode, urlsplit

import urllib3
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from pipeline.data_config import DanbooruSource

log = logging.getLogger(__name__)

ENV_LOGIN, ENV_API_KEY = "DANBOORU_LOGIN", "DANBOORU_API_KEY"
USER_AGENT = "anime-fgvc-pipeline/0.1 (danbooru acquire source)"  # Danbooru asks crawlers for a real User-Agent
# What a broken connection looks like, whether it breaks before the answer or while its body streams in.
NETWORK_ERRORS = (urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError, TimeoutError)

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------------------ errors


class FetchError(RuntimeError):
    """A request failed for good (a refused status, or the retry budget spent). Names the URL, never credentials."""


class _Retryable(Exception):
    """A transient failure (429, 5xx, timeout, reset, truncated or unparsable body): worth another attempt."""

    def __init__(self, what: str, retry_after: float | None = None) -> None:
        super().__init__(what)
        self.retry_after = retry_after


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
        raise ValueError(
            f"danbooru credentials: {missing} is missing; set both or neither "
            f"(acquire.danbooru.credentials_file: {cfg.credentials_file})"
        )
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


def check_transport(base_url: str, credentials: Credentials | None) -> None:
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
        raise ValueError(
            f"acquire.danbooru.base_url: refusing to send credentials over plain http to {host}; use https"
        )


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
            num_pools=8,
            maxsize=cfg.max_connections,
            headers={"User-Agent": USER_AGENT},
            timeout=urllib3.Timeout(connect=cfg.timeout_s, read=cfg.timeout_s),
            retries=False,
        )
        self._backoff = wait_exponential_jitter(
            multiplier=cfg.backoff_s, jitter=cfg.backoff_s, max=max(60.0, cfg.backoff_s)
        )

    def host_problem(self, url: str) -> str | None:
        """Why this URL may not be downloaded (None: it may)."""
        try:
            parts = urlsplit(url)
            _ = parts.port  # raises on a malformed port
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
        retrying = Retrying(
            stop=stop_after_attempt(self.cfg.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception_type(_Retryable),
            before_sleep=lambda state: self._note_retry(url, state),
            retry_error_callback=lambda state: self._give_up(url, state),
        )
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
                raise FetchError(
                    f"GET {url}: HTTP {resp.status} asks to retry after {retry_after:.0f} s, more than "
                    f"acquire.danbooru.max_retry_after_s={self.cfg.max_retry_after_s:g}: run again "
                    "later (finished posts are kept)"
                )
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
        raise FetchError(
            f"GET {url} failed after {state.attempt_number} attempts "
            f"(acquire.danbooru.max_retries={self.cfg.max_retries}); last: {exc}"
        ) from exc


def _read_json_list(resp: urllib3.BaseHTTPResponse) -> list:
    body = resp.read()
    try:
        data = json.loads(body)
    except ValueError as exc:  # e.g. a proxy's HTML error page with status 200
        raise _Retryable(f"invalid JSON ({len(body)} bytes): {exc}") from exc
    if not isinstance(data, list):
        raise _Retryable(f"expected a JSON list, got {type(data).__name__}")
    return data
