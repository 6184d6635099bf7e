"""The `danbooru` source against a fake Danbooru API (tests/danbooru_server.py) on loopback addresses.

The expected manifests are computed here from the fake server's post table (the posts of kind "good"), not from the
crawler, so every test checks behaviour: what is downloaded (the server counts requests per URL), what is kept or
rejected, what is sent (credentials, rates, connections) and what is left on disk.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from PIL import Image
from polars.testing import assert_frame_equal

from pipeline import cli
from pipeline.config import AcquireParams, DanbooruSource, ParamsError, validate_section
from pipeline.data import manifest
from pipeline.data.acquire import acquire
from pipeline.data.danbooru import CrawlError
from pipeline.outdir import MARKER
from tests.danbooru_server import OTHER_HOST, POSTS, TEST_FILTERS, FakeDanbooru, FakePost

REPO = Path(__file__).resolve().parents[1]
CHARACTERS = ("hatsune_miku", "kaname_madoka", "saber_(fate)")
SECRET = "k3y-that-must-NEVER-leak-0123456789abcdef"
SCHEMA = {
    **manifest.SCHEMA,
    "post_id": pl.Int64,
    "character": pl.String,
    "artist": pl.String,
    "rating": pl.String,
    "score": pl.Int64,
    "source_url": pl.String,
}
# Rejected by the crawler, by file kind (the mismatch post's large file is not an image at all).
REJECTED = {
    "large": {122: "not_image", 125: "duplicate_md5", 127: "bad_host", 132: "not_image", 138: "bad_ext"},
    "original": {122: "md5_mismatch", 125: "duplicate_md5", 127: "bad_host", 132: "not_image", 138: "bad_ext"},
}
NEVER_FETCHED = ("dup", "other_host", "bad_ext", "deleted", "rating", "multi", "excluded")
JUDGED_BY_BYTES = ("html", "mismatch")  # must be downloaded (once) to be refused


@pytest.fixture
def server():
    with FakeDanbooru() as s:
        yield s


@pytest.fixture(autouse=True)
def _no_developer_credentials(monkeypatch):
    monkeypatch.delenv("DANBOORU_LOGIN", raising=False)
    monkeypatch.delenv("DANBOORU_API_KEY", raising=False)


def config(server: FakeDanbooru, **kw) -> DanbooruSource:
    """Small pages (so paging happens), fast rates and tiny backoffs so faults cost milliseconds."""
    base = dict(
        base_url=server.base_url,
        cdn_hosts=server.cdn_hosts,
        characters=CHARACTERS,
        page_limit=3,
        requests_per_second=200.0,
        max_connections=3,
        timeout_s=5.0,
        max_retries=3,
        backoff_s=0.01,
        **TEST_FILTERS,
    )
    return DanbooruSource(**{**base, **kw})


def crawl(server: FakeDanbooru, out: Path, root: Path | None = None, **kw) -> pl.DataFrame:
    """The acquire stage as DVC runs it (it also writes and validates out/manifest.parquet)."""
    return acquire(AcquireParams(source="danbooru", danbooru=config(server, **kw)), root or out.parent, out)


def file_of(post: FakePost, kind: str) -> tuple[str, bytes, str]:
    """(URL path, bytes, extension) the crawler should fetch for this post."""
    if kind == "original":
        return post.original_path, post.original, post.original_ext
    return post.sample_path, post.sample, post.sample_ext


def good_posts(characters=CHARACTERS) -> list[FakePost]:
    return [p for p in POSTS if p.kind == "good" and p.characters[0] in characters]


def expected_manifest(server: FakeDanbooru, kind: str = "large", characters=CHARACTERS) -> pl.DataFrame:
    posts = sorted(good_posts(characters), key=lambda p: (p.characters[0], p.id))
    names = sorted({p.characters[0] for p in posts})
    rows = []
    for p in posts:
        path, body, ext = file_of(p, kind)
        artist = p.artists[0] if p.artists else None
        rows.append(
            dict(
                image_id=f"danbooru-{p.id}",
                path=f"images/{p.id}.{ext}",
                class_id=names.index(p.characters[0]),
                class_name=p.characters[0],
                source="danbooru",
                group=artist or f"post-{p.id}",
                md5=hashlib.md5(body).hexdigest(),
                width=Image.open(io.BytesIO(body)).size[0],
                height=Image.open(io.BytesIO(body)).size[1],
                split=None,
                post_id=p.id,
                character=p.characters[0],
                artist=artist,
                rating=p.rating,
                score=p.score,
                source_url=server.url(p.host, path),
            )
        )
    return pl.DataFrame(rows, schema=SCHEMA)


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def journal_ids(out: Path) -> set[int]:
    """Post ids of the complete journal lines (a torn last line is not a finished post)."""
    ids = set()
    for line in (out / "journal.jsonl").read_text().splitlines(keepends=True):
        if line.endswith("\n"):
            ids.add(json.loads(line)["post_id"])
    return ids


def assert_no_secret(root: Path, *texts: str, allow: tuple[Path, ...] = ()) -> None:
    for f in files_under(root) - set(allow):
        assert SECRET.encode() not in f.read_bytes(), f"the API key leaked into {f}"
    for text in texts:
        assert SECRET not in text


# ---------------------------------------------------------------------------------------------------- what is kept


@pytest.mark.parametrize("kind", ["large", "original"])
def test_crawl_downloads_each_good_post_once_and_no_bad_one(server, tmp_path, capsys, kind) -> None:
    out = tmp_path / "raw"
    df = crawl(server, out, file=kind)

    assert_frame_equal(df, expected_manifest(server, kind))
    assert_frame_equal(manifest.read(out), df)  # what the next stage reads (schema validated)
    for p in good_posts():
        path = file_of(p, kind)[0]
        assert (server.hits(path), server.served(path)) == (1, 1), f"post {p.id}"
    for p in POSTS:
        if p.kind in NEVER_FETCHED:
            assert all(server.hits(path) == 0 for path in p.paths), f"{p.kind} post {p.id} was fetched"
        if p.kind in JUDGED_BY_BYTES:  # a body that does not match the API's md5 is fetched once more
            assert server.hits(file_of(p, kind)[0]) == (2 if (p.kind, kind) == ("mismatch", "original") else 1)
    assert not [r for r in server.log if r.host == OTHER_HOST]
    assert all(int(r.query["limit"]) <= 200 for r in server.log if r.path == "/posts.json")
    rejected = pl.read_parquet(out / "rejected.parquet")
    assert dict(zip(rejected["post_id"], rejected["reason"])) == REJECTED[kind]
    # Everything the crawl wrote is inside out/: the manifest's images, three bookkeeping files and the marker
    # that makes the folder the project's own (pipeline/outdir.py).
    assert files_under(tmp_path) == {
        out / "manifest.parquet",
        out / "journal.jsonl",
        out / "rejected.parquet",
        out / MARKER,
        *(out / p for p in df["path"]),
    }
    summary = capsys.readouterr().out
    assert "kept 12 posts of 3 characters" in summary and "failed 0" in summary


def test_cursor_paging_after_the_first_page(server, tmp_path) -> None:
    df = crawl(server, tmp_path / "raw", characters=("hatsune_miku",), page_limit=2)
    assert_frame_equal(df, expected_manifest(server, characters=("hatsune_miku",)))
    pages = [r.query for r in server.log if r.path == "/posts.json"]
    miku = sorted((p for p in POSTS if "hatsune_miku" in p.characters), key=lambda p: -p.id)
    # page 1, then b<lowest id of the page before>, until an empty page; never a numbered page past 1.
    expected = ["1"] + [f"b{miku[min(i + 1, len(miku) - 1)].id}" for i in range(0, len(miku), 2)]
    assert [q["page"] for q in pages] == expected
    assert all(q["limit"] == "2" and q["tags"] == "hatsune_miku" for q in pages)


def test_max_posts_stops_paging(server, tmp_path) -> None:
    df = crawl(server, tmp_path / "raw", characters=("hatsune_miku",), max_posts_per_character=2)
    assert df["post_id"].to_list() == [137, 140]  # the two newest good posts (138 between them is rejected)
    assert [r.query["page"] for r in server.log if r.path == "/posts.json"] == ["1"]
    assert sum(r.path.startswith("/data/") for r in server.log) == 2


def test_top_characters_from_tags_api(server, tmp_path) -> None:
    df = crawl(server, tmp_path / "raw", characters=(), top_characters=2)
    tags = [r.query for r in server.log if r.path == "/tags.json"]
    assert tags == [{"search[category]": "4", "search[order]": "count", "limit": "2", "page": "1"}]
    assert_frame_equal(df, expected_manifest(server, characters=("hatsune_miku", "kaname_madoka")))


@pytest.mark.parametrize("kind", ["large", "original"])
def test_size_cap_rejects_then_a_larger_cap_fetches(server, tmp_path, kind) -> None:
    saber = ("saber_(fate)",)
    out = tmp_path / "raw"
    df = crawl(server, out, characters=saber, file=kind, max_file_mb=0.0001)  # about 100 bytes
    assert df.height == 0
    rejected = pl.read_parquet(out / "rejected.parquet")
    assert set(rejected["reason"]) == {"too_large", "bad_host"}
    images = [r for r in server.log if r.path.startswith("/data/")]
    # An original's file_size is known before downloading, also where the large file is the original (135, 120);
    # another large file (128, 122) is refused on its Content-Length.
    assert len(images) == (0 if kind == "original" else 2)
    assert not list((out / "images").iterdir())

    df = crawl(server, out, characters=saber, file=kind)  # the verdict was about the old cap: fetched now
    assert_frame_equal(df, expected_manifest(server, kind, characters=saber))


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"characters": (), "top_characters": 0}, "acquire.danbooru.characters"),
        ({"characters": ("two words",)}, "acquire.danbooru.characters"),
        ({"cdn_hosts": ("https://cdn.example/x",)}, "acquire.danbooru.cdn_hosts"),
    ],
)
def test_config_mistakes_name_the_key(tmp_path, change, key) -> None:
    cfg = DanbooruSource(**{"characters": ("x",), **change})
    with pytest.raises(ValueError, match=key):
        acquire(AcquireParams(source="danbooru", danbooru=cfg), tmp_path, tmp_path / "raw")


def test_a_large_file_that_is_the_original_is_checked_against_the_md5(server, tmp_path, caplog) -> None:
    """Danbooru serves the original as large_file_url when there is no sample: with the default `file: large` that
    body is checked against the post's md5 too. Damaged once: fetched again and kept; damaged twice: rejected."""
    caplog.set_level(logging.INFO)
    saber = ("saber_(fate)",)
    once, twice = server.post(135), server.post(120)
    assert once.same_large and twice.same_large and once.kind == twice.kind == "good"
    server.inject(once.original_path, "corrupt", times=1)
    server.inject(twice.original_path, "corrupt", times=2)
    out = tmp_path / "raw"

    df = crawl(server, out, characters=saber)

    assert_frame_equal(df, expected_manifest(server, characters=saber).filter(pl.col("post_id") != twice.id))
    assert (server.hits(once.original_path), server.served(once.original_path)) == (2, 1)
    assert (server.hits(twice.original_path), server.served(twice.original_path)) == (2, 0)
    rejected = pl.read_parquet(out / "rejected.parquet")
    assert dict(zip(rejected["post_id"], rejected["reason"])) == {
        120: "md5_mismatch",
        122: "not_image",
        127: "bad_host",
    }
    assert twice.md5 in rejected.filter(pl.col("post_id") == twice.id)["detail"].item()
    assert not (out / f"images/{twice.id}.jpg").exists()
    assert f"post {twice.id}: md5_mismatch" in caplog.text and f"post {once.id}: md5_mismatch" in caplog.text

    server.reset_log()  # the verdict is journaled: a re-run does not download the rejected post again
    assert_frame_equal(crawl(server, out, characters=saber), df)
    assert not [r for r in server.log if r.path.startswith("/data/")]


def test_rerun_checks_an_unverified_original_kept_by_an_earlier_crawl(server, tmp_path) -> None:
    """A journal line of a large file that is the original, kept with another md5 than the post's (as crawls before
    the md5 check of such files could keep it), is not trusted: the file is fetched and checked again."""
    saber = ("saber_(fate)",)
    out = tmp_path / "raw"
    first = crawl(server, out, characters=saber)
    post = server.post(135)
    lines = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    for rec in lines:
        if rec["post_id"] == post.id:
            rec["md5"] = "0" * 32
    (out / "journal.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    server.reset_log()

    again = crawl(server, out, characters=saber)

    assert_frame_equal(again, first)
    assert [r.path for r in server.log if r.path.startswith("/data/")] == [post.original_path]


# ---------------------------------------------------------------------------------------------------------- faults


def test_transient_faults_are_retried(server, tmp_path) -> None:
    good = {p.id: p for p in good_posts()}
    faulted = {140: "500", 137: "503", 133: "timeout", 120: "truncate", 135: "429"}
    for pid, kind in faulted.items():
        server.inject(file_of(good[pid], "large")[0], kind, retry_after=0.05, delay=3.0)
    pages = {
        "tags=kaname_madoka&limit=3&page=1": "429",
        "page=b137": "badjson",
        "page=b133": "truncate",
        "page=b127": "500",
    }
    for match, kind in pages.items():
        server.inject(match, kind, retry_after=0.05)

    df = crawl(server, tmp_path / "raw", timeout_s=1.0)

    assert_frame_equal(df, expected_manifest(server))
    for p in good.values():
        path = file_of(p, "large")[0]
        assert server.served(path) == 1
        assert server.hits(path) == (2 if p.id in faulted else 1), f"post {p.id}"
    for match in pages:
        assert sum(match in r.target for r in server.log) == 2


def test_retry_after_is_honoured(server, tmp_path) -> None:
    path = file_of(good_posts()[0], "large")[0]
    server.inject(path, "429", retry_after=1)
    crawl(server, tmp_path / "raw", characters=("hatsune_miku",))
    first, second = [r for r in server.log if r.path == path]
    assert first.status == 429 and second.status == 200
    assert second.start - first.start >= 1.0


def test_a_retry_after_beyond_the_limit_fails_fast_and_the_rerun_fetches_it(server, tmp_path) -> None:
    """A server asking for an hour's pause does not stall the crawl: that file fails (not journaled), the others
    are downloaded, and the next run fetches only it."""
    path = file_of(good_posts()[0], "large")[0]
    server.inject(path, "429", retry_after=3600)
    start = time.monotonic()
    first = crawl(server, tmp_path / "raw", characters=("hatsune_miku",), max_retry_after_s=5)
    assert time.monotonic() - start < 60
    assert [r.status for r in server.log if r.path == path] == [429]
    server.reset_log()
    second = crawl(server, tmp_path / "raw", characters=("hatsune_miku",), max_retry_after_s=5)
    assert second.height == first.height + 1
    assert server.hits(path) == 1 and sum(server.hits(file_of(p, "large")[0]) for p in good_posts()) == 1


def test_api_retry_after_beyond_the_limit_stops_naming_the_param(server, tmp_path) -> None:
    server.inject("posts.json", "429", retry_after=3600)
    with pytest.raises(CrawlError, match=r"retry after 3600 s, more than acquire.danbooru.max_retry_after_s=5"):
        crawl(server, tmp_path / "raw", characters=("hatsune_miku",), max_retry_after_s=5)


def test_api_failure_after_retry_budget_stops_with_clear_error_then_resumes(server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DANBOORU_LOGIN", "alice")
    monkeypatch.setenv("DANBOORU_API_KEY", SECRET)
    server.require_auth("alice", SECRET)
    server.inject("page=b133", "503", times=100, retry_after=0.01)
    out = tmp_path / "raw"

    with pytest.raises(CrawlError) as err:
        crawl(server, out, max_retries=2)

    url = f"{server.base_url}/posts.json?tags=kaname_madoka&limit=3&page=b133"
    assert url in str(err.value) and "HTTP 503" in str(err.value) and "3 attempts" in str(err.value)
    assert SECRET not in str(err.value) and SECRET not in repr(err.value.__cause__)
    assert sum("page=b133" in r.target for r in server.log) == 3
    done = journal_ids(out)
    assert {p.id for p in good_posts(("hatsune_miku",))} <= done  # finished before the failure, kept on disk

    server.clear_faults()
    server.reset_log()
    df = crawl(server, out)
    assert_frame_equal(df, expected_manifest(server))
    for p in good_posts():
        assert server.hits(file_of(p, "large")[0]) == (0 if p.id in done else 1), f"post {p.id}"


def test_image_failure_is_counted_and_skipped(server, tmp_path, capsys) -> None:
    broken = next(p for p in good_posts() if p.id == 137)  # a post without a twin (139's copy would step in)
    path = file_of(broken, "large")[0]
    server.inject(path, "500", times=100)
    out = tmp_path / "raw"

    df = crawl(server, out, max_retries=1)

    expected = expected_manifest(server)
    assert_frame_equal(df, expected.filter(pl.col("post_id") != broken.id))
    assert server.hits(path) == 2
    assert "failed 1" in capsys.readouterr().out
    assert broken.id not in pl.read_parquet(out / "rejected.parquet")["post_id"].to_list()

    server.clear_faults()  # the next run fetches just that one
    server.reset_log()
    assert_frame_equal(crawl(server, out), expected)
    assert [r.path for r in server.log if r.path.startswith("/data/")] == [path]


# ---------------------------------------------------------------------------------------------------- credentials


def test_credentials_reach_the_api_and_never_leak(server, tmp_path, monkeypatch, capsys, caplog) -> None:
    caplog.set_level(logging.DEBUG)  # urllib3's and the crawler's own debug lines included
    server.require_auth("alice", SECRET)
    (tmp_path / ".danbooru-credentials").write_text("login=alice\napi_key=wrong-key\n")
    monkeypatch.setenv("DANBOORU_API_KEY", SECRET)  # the environment wins over the file
    server.inject("page=b137", "500")  # a retry, so retry logging runs too
    out = tmp_path / "raw"

    crawl(server, out, root=tmp_path)

    header = "Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode()
    api = [r for r in server.log if r.path.endswith(".json")]
    assert api and all(r.auth == header for r in api)
    assert all(r.auth is None for r in server.log if r.host != "127.0.0.1")  # the CDN never sees them
    captured = capsys.readouterr()
    assert_no_secret(tmp_path, captured.out, captured.err, caplog.text)


def test_wrong_credentials_fail_fast_without_echoing_them(server, tmp_path) -> None:
    server.require_auth("alice", SECRET)
    (tmp_path / ".danbooru-credentials").write_text(f"login=alice\napi_key={SECRET}-typo\n")
    with pytest.raises(CrawlError, match="HTTP 401") as err:
        crawl(server, tmp_path / "raw", root=tmp_path)
    assert SECRET not in str(err.value)
    assert len(server.log) == 1  # a refusal is not retried


def test_unsafe_urls_are_refused() -> None:
    with pytest.raises(ParamsError, match="acquire.danbooru.base_url: 'danbooru.donmai.us' is not an http"):
        validate_section(AcquireParams, {"danbooru": {"base_url": "danbooru.donmai.us"}}, "test", "acquire.")
    with pytest.raises(ParamsError, match="acquire.danbooru.base_url: 'ftp://example.org' is not an http"):
        validate_section(AcquireParams, {"danbooru": {"base_url": "ftp://example.org"}}, "test", "acquire.")
    with pytest.raises(ParamsError, match="must not contain a login") as err:
        validate_section(
            AcquireParams, {"danbooru": {"base_url": f"https://alice:{SECRET}@danbooru.donmai.us"}}, "test", "acquire."
        )
    assert SECRET not in str(err.value)


def test_credentials_are_not_sent_over_plain_http_to_other_hosts(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DANBOORU_LOGIN", "alice")
    monkeypatch.setenv("DANBOORU_API_KEY", SECRET)
    cfg = DanbooruSource(base_url="http://danbooru.example", characters=("x",))
    with pytest.raises(ValueError, match="refusing to send credentials over plain http"):
        acquire(AcquireParams(source="danbooru", danbooru=cfg), tmp_path, tmp_path / "raw")


# ---------------------------------------------------------------------------------------------------- politeness


def test_rate_limit_is_kept_across_threads(server, tmp_path) -> None:
    rate = 8.0
    crawl(
        server,
        tmp_path / "raw",
        characters=("hatsune_miku", "saber_(fate)"),
        requests_per_second=rate,
        max_connections=3,
    )
    starts = sorted(r.start for r in server.log)
    assert len(starts) >= 15
    assert starts[-1] - starts[0] >= (len(starts) - 1) / rate - 0.05
    k = 4  # any k+1 consecutive requests span at least k intervals (small slack for scheduling noise)
    assert min(b - a for a, b in zip(starts, starts[k:])) >= k / rate - 0.06


@pytest.mark.parametrize("connections", [1, 3])
def test_max_connections_is_kept(server, tmp_path, connections) -> None:
    server.set_image_delay(0.15)  # slow answers: without the limit, more would be in flight at once
    crawl(server, tmp_path / "raw", characters=("hatsune_miku",), max_connections=connections)
    assert server.max_in_flight <= connections
    if connections > 1:
        assert server.max_in_flight >= 2  # downloads do run in parallel


# --------------------------------------------------------------------------------------------------------- resume


def test_rerun_skips_finished_posts_repairs_torn_journal_and_removes_temp_files(server, tmp_path) -> None:
    out = tmp_path / "raw"
    first = crawl(server, out)
    with open(out / "journal.jsonl", "a") as f:
        f.write('{"post_id": 140, "file": "lar')  # what a kill in the middle of a write leaves
    (out / "images/.140.jpg.x1y2.tmp").write_bytes(b"half")  # an interrupted atomic write
    (out / "images/999.jpg").write_bytes(b"stray")
    server.reset_log()

    again = crawl(server, out)

    assert_frame_equal(again, first)
    assert not [r for r in server.log if r.path.startswith("/data/")]
    assert files_under(out / "images") == {out / p for p in first["path"]}
    assert all(json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines())


def test_sigkill_then_resume_gives_the_uninterrupted_manifest(server, tmp_path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    creds = project / ".danbooru-credentials"
    creds.write_text(f"login=alice\napi_key={SECRET}\n")
    server.require_auth("alice", SECRET)
    reference = tmp_path / "reference"
    crawl(server, reference, root=project, max_connections=2)

    server.reset_log()
    server.set_image_delay(0.15)
    out = project / "raw"
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "acquire",
        "danbooru",
        "--out",
        "raw",
        "--base-url",
        server.base_url,
        "--characters",
        ",".join(CHARACTERS),
        "--cdn-hosts",
        "localhost",
        "--ratings",
        "g,s",
        "--exclude-tags",
        "comic",
        "--page-limit",
        "3",
        "--requests-per-second",
        "200",
        "--max-connections",
        "2",
        "--timeout",
        "5",
        "--max-retries",
        "3",
        "--backoff",
        "0.01",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DANBOORU_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "journal.jsonl").exists() and len(journal_ids(out)) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    killed_output = proc.communicate(timeout=10)[0]
    assert proc.returncode == -signal.SIGKILL, killed_output
    done = journal_ids(out)
    assert 3 <= len(done) < len(good_posts()) + len(JUDGED_BY_BYTES)  # killed mid-crawl

    server.set_image_delay(0.0)
    resumed = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    assert_frame_equal(manifest.read(out), manifest.read(reference))
    assert_frame_equal(pl.read_parquet(out / "rejected.parquet"), pl.read_parquet(reference / "rejected.parquet"))
    fetched = good_posts() + [p for p in POSTS if p.kind in JUDGED_BY_BYTES]
    for p in fetched:
        hits = server.hits(file_of(p, "large")[0])
        # Finished posts are never fetched again; one in flight at the kill is fetched at most once more.
        assert (hits == 1) if p.id in done else (1 <= hits <= 2), f"post {p.id}: {hits} requests"
    assert not [f for f in files_under(out) if f.name.endswith(".tmp")]
    assert {f for f in files_under(out / "images")} == {out / p for p in manifest.read(out)["path"]}
    assert_no_secret(tmp_path, killed_output, resumed.stdout, resumed.stderr, allow=(creds,))


# ------------------------------------------------------------------------------------------------------------ CLI


def test_cli_help_lists_the_flags(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["acquire", "danbooru", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--out",
        "--base-url",
        "--characters",
        "--top-characters",
        "--max-posts",
        "--ratings",
        "--exclude-tags",
        "--allow-multi-character",
        "--file",
        "--requests-per-second",
        "--max-connections",
        "--cdn-hosts",
        "--timeout",
        "--max-retries",
        "--backoff",
        "--max-file-mb",
        "--page-limit",
        "--credentials-file",
    ):
        assert flag in text
    assert "--api-key" not in text and "--login" not in text


def test_cli_bad_base_url_exits_2_naming_the_key(tmp_path, capsys) -> None:
    out = tmp_path / "raw"
    code = cli.main(["acquire", "danbooru", "--base-url", "ftp://example.org", "--characters", "x", "--out", str(out)])
    assert code == 2
    assert "base_url" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


def test_cli_flags_become_the_params_section(tmp_path, monkeypatch) -> None:
    captured = {}

    def fake_acquire(cfg: AcquireParams, root: Path, out: Path) -> pl.DataFrame:
        captured["cfg"] = cfg
        return pl.DataFrame(schema=manifest.SCHEMA)

    monkeypatch.setattr("pipeline.data.acquire.acquire", fake_acquire)
    code = cli.main(
        [
            "acquire",
            "danbooru",
            "--out",
            str(tmp_path),
            "--characters",
            "a, b",
            "--max-posts",
            "7",
            "--ratings",
            "g",
            "--allow-multi-character",
            "--file",
            "original",
            "--cdn-hosts",
            "c1,c2",
        ]
    )
    assert code == 0
    cfg = captured["cfg"].danbooru
    assert (
        cfg.characters,
        cfg.max_posts_per_character,
        cfg.ratings,
        cfg.single_character,
        cfg.file,
        cfg.cdn_hosts,
    ) == (("a", "b"), 7, ("g",), False, "original", ("c1", "c2"))
    assert cfg.base_url == DanbooruSource().base_url  # flags not given keep the params defaults
