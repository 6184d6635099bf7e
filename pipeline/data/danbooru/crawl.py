"""The crawl loop: characters -> pages -> batches of downloads -> commits in API order -> the manifest.

Determinism: posts are committed in API order, batch by batch, so what is kept (which of two equal files wins, where
max_posts_per_character stops) does not depend on download timing.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from tenacity import Retrying, retry_if_exception, stop_after_attempt

from pipeline.data import manifest
from pipeline.data.danbooru.client import Client, FetchError, check_transport, load_credentials
from pipeline.data.danbooru.journal import Journal
from pipeline.data.danbooru.posts import (
    IMAGES,
    MISMATCH_REASONS,
    Download,
    Post,
    Rejected,
    plan_download,
    save_image,
    skip_reason,
)
from pipeline.data_config import DanbooruSource
from pipeline.io import write_parquet
from pipeline.progress import progress

log = logging.getLogger(__name__)

SOURCE = "danbooru"
JOURNAL = "journal.jsonl"
REJECTED = "rejected.parquet"
EXTRA_SCHEMA: dict[str, pl.DataType] = {
    "post_id": pl.Int64,
    "character": pl.String,
    "artist": pl.String,
    "rating": pl.String,
    "score": pl.Int64,
    "source_url": pl.String,
}
REJECTED_SCHEMA: dict[str, pl.DataType] = {"post_id": pl.Int64, "reason": pl.String, "detail": pl.String}


class CrawlError(ConnectionError):
    """The crawl stopped because an API request failed; what finished is in the journal, a re-run resumes."""


# ------------------------------------------------------------------------------------------------------- validation


def check_config(cfg: DanbooruSource) -> None:
    """What the params model cannot check by type: tag syntax, something to crawl (it checks the URL)."""
    bad = [c for c in cfg.characters if not c or any(ch.isspace() for ch in c)]
    if bad:
        raise ValueError(f"acquire.danbooru.characters: {bad} are not single tags (Danbooru tags use underscores)")
    if not cfg.characters and cfg.top_characters == 0:
        raise ValueError(
            "acquire.danbooru.characters: empty while acquire.danbooru.top_characters is 0; "
            "name the characters to crawl or set top_characters"
        )
    bad = [h for h in cfg.cdn_hosts if not h or any(c in h for c in "/:@ ")]
    if bad:
        raise ValueError(f"acquire.danbooru.cdn_hosts: {bad} are not bare host names (e.g. cdn.donmai.us)")


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
        return (
            f"danbooru: kept {self.kept} posts of {n_classes} characters; rejected {_by_reason(self.rejected)}; "
            f"skipped {_by_reason(self.skipped)}; failed {self.failed}"
        )


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

    def __enter__(self) -> _Crawl:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.bar.close()

    # -- API
    def _api(self, path: str, params: dict[str, Any]) -> list:
        try:
            return self.client.get_json(self.cfg.base_url.rstrip("/") + path, params)
        except FetchError as exc:
            raise CrawlError(
                f"danbooru: crawl stopped: {exc}. Finished posts are in {self.journal.path}; run again to resume"
            ) from exc

    def top_characters(self, n: int) -> list[str]:
        """The n character tags with most posts (/tags.json, category 4 = character)."""
        limit, names, page = min(n, 1000), [], 1
        while len(names) < n:
            rows = self._api(
                "/tags.json", {"search[category]": 4, "search[order]": "count", "limit": limit, "page": page}
            )
            names += [
                r["name"]
                for r in rows
                if isinstance(r, dict)
                and isinstance(r.get("name"), str)
                and r["name"]
                and not any(c.isspace() for c in r["name"])
            ]
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
                    raise Rejected("duplicate_md5", f"same md5 as post {self.kept_md5[post.md5]}")
                dl = plan_download(post, self.cfg, self.client, self.max_bytes)
            except Rejected as r:
                self._reject(post.id, r.reason, r.detail)
                continue
            batch.append((post, dl))
            md5s.add(post.md5)
        return batch

    def _run_batch(self, batch: list[tuple[Post, Download]], character: str) -> int:
        """Fetch what the journal does not have (concurrently), then commit in order. Returns the number kept."""
        pending = [self._from_journal(dl) or self.pool.submit(self._fetch, dl) for _, dl in batch]
        kept = 0
        for (post, _dl), outcome in zip(batch, pending):
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
            # Earlier versions kept a large file that is the original without checking its md5: check it now.
            if dl.md5 is not None and rec.get("md5") != dl.md5:
                return None
            f = self.out / dl.path
            if f.is_file() and f.stat().st_size == rec.get("bytes"):
                return rec
        return None

    def _fetch(self, dl: Download) -> dict:
        """Worker thread: download one file and journal the outcome at once (a kill loses only in-flight posts)."""
        record: dict[str, Any] = {"post_id": dl.post_id, "file": self.cfg.file, "url": dl.url}
        # A body that does not match the API's md5/size is fetched once more: a damaged transfer deserves a second
        # try, a post whose md5 is wrong in the API does not deserve more (the rate limit spaces the two requests).
        once_more = Retrying(
            stop=stop_after_attempt(2),
            retry=retry_if_exception(_is_mismatch),
            reraise=True,
            before_sleep=lambda state: log.info(
                "danbooru: post %d: %s; fetching it once more", dl.post_id, state.outcome.exception()
            ),
        )
        try:
            saved = once_more(
                self.client.get, dl.url, lambda resp: save_image(resp, self.out / dl.path, dl, self.max_bytes)
            )
        except Rejected as r:
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


def _is_mismatch(exc: BaseException) -> bool:
    return isinstance(exc, Rejected) and exc.reason in MISMATCH_REASONS


def _manifest_row(post: Post, character: str, rec: dict) -> dict[str, Any]:
    artist = post.artists[0] if post.artists else None
    return {
        "image_id": f"danbooru-{post.id}",
        "path": rec["path"],
        "class_name": character,
        "source": SOURCE,
        "group": artist or f"post-{post.id}",
        "md5": rec["md5"],
        "width": rec["width"],
        "height": rec["height"],
        "split": None,
        "post_id": post.id,
        "character": character,
        "artist": artist,
        "rating": post.rating,
        "score": post.score,
        "source_url": rec["url"],
    }


def _manifest(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """Class ids index the sorted kept characters; rows sorted by (character, post_id): deterministic."""
    ids = {name: i for i, name in enumerate(sorted({r["character"] for r in rows}))}
    df = pl.DataFrame(
        [{**r, "class_id": ids[r["character"]]} for r in rows], schema={**manifest.SCHEMA, **EXTRA_SCHEMA}
    )
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
    check_transport(cfg.base_url, credentials)
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
