"""Posts: the API's fields (untrusted JSON), the metadata filters, what to fetch, and the checks on the bytes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import urllib3
from PIL import Image

from pipeline.data.danbooru.client import Client
from pipeline.data_config import DanbooruSource
from pipeline.io import atomic_path

IMAGES = "images"
# Saved names use these strings (ours), never text from the server: a `file_ext` of `../../x` cannot leave out/.
EXTENSIONS = {e: e for e in ("jpg", "jpeg", "png", "gif", "webp", "bmp")}


# The body is not the file the API describes: worth one more download (a damaged transfer) before rejecting.
MISMATCH_REASONS = ("md5_mismatch", "size_mismatch")


class Rejected(Exception):
    """The post or its bytes are not something we keep; `reason` is the short key the counts use."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


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
    def parse(cls, d: Any) -> Post | None:
        """None when the entry has no usable id (nothing can be named or saved after it)."""
        if not isinstance(d, dict) or (_int(d, "id") or 0) <= 0:
            return None
        return cls(
            id=d["id"],
            md5=_str(d, "md5").lower(),
            file_url=_str(d, "file_url"),
            large_file_url=_str(d, "large_file_url"),
            file_ext=_str(d, "file_ext").lower(),
            file_size=_int(d, "file_size"),
            characters=tuple(_str(d, "tag_string_character").split()),
            artists=tuple(_str(d, "tag_string_artist").split()),
            tags=frozenset(_str(d, "tag_string").split()),
            rating=_str(d, "rating"),
            score=_int(d, "score"),
        )


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
    md5: str | None  # expected md5: when the URL is the original's (a sample is a re-encode with its own md5)
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
    """What to fetch for a post that passed the filters; raises Rejected for what needs no download to refuse."""
    # Danbooru gives large_file_url = file_url when no sample exists (most small images): that fetch is the original
    # too, so it is checked against the post's md5 and file_size whichever `file` mode asked for it.
    original = cfg.file == "original" or post.large_file_url in ("", post.file_url)
    url = post.file_url if original else post.large_file_url
    problem = client.host_problem(url)
    if problem:
        raise Rejected("bad_host", f"{problem}: {url[:200]}")
    ext = _extension(url, post.file_ext, original)
    if ext is None:
        raise Rejected("bad_ext", f"file_ext {post.file_ext[:40]!r}, URL {url[:200]}")
    if original and post.file_size is not None and post.file_size > max_bytes:
        raise Rejected("too_large", f"{post.file_size} bytes > acquire.danbooru.max_file_mb")
    return Download(
        post.id, url, ext, post.md5 if original and post.md5 else None, post.file_size if original else None
    )


def save_image(resp: urllib3.BaseHTTPResponse, dest: Path, dl: Download, max_bytes: int) -> dict[str, Any]:
    """Stream an image answer to `dest` (atomically: complete or absent, even under SIGKILL) and check it."""
    ctype = resp.headers.get("Content-Type", "")
    if not ctype.lower().startswith("image/"):
        raise Rejected("not_image", f"Content-Type {ctype[:60]!r}")
    declared = resp.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise Rejected("too_large", f"{declared} bytes > acquire.danbooru.max_file_mb")
    digest, n = hashlib.md5(), 0
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            for chunk in resp.stream(1 << 16):
                n += len(chunk)
                if n > max_bytes:
                    raise Rejected("too_large", f"more than {max_bytes} bytes > acquire.danbooru.max_file_mb")
                digest.update(chunk)
                f.write(chunk)
        md5 = digest.hexdigest()
        if dl.md5 is not None and md5 != dl.md5:
            raise Rejected("md5_mismatch", f"got {md5}, the API says {dl.md5}")
        if dl.size is not None and n != dl.size:
            raise Rejected("size_mismatch", f"got {n} bytes, the API says {dl.size}")
        width, height = _decoded_size(tmp)
    return {"path": dl.path, "md5": md5, "bytes": n, "width": width, "height": height}


def _decoded_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() leaves the image unusable; reopen for the header
            return im.size
    except Exception as exc:  # Pillow raises many types for bad data (and DecompressionBombError)
        raise Rejected("not_image", f"does not decode as an image ({type(exc).__name__})") from None
