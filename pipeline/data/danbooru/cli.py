"""The flags of `python -m pipeline acquire danbooru`: named after the acquire.danbooru keys, never credentials."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.data.danbooru.client import ENV_API_KEY, ENV_LOGIN
from pipeline.data_config import DanbooruSource

CLI_HELP = (
    f"crawl the Danbooru JSON API (credentials, optional: {ENV_LOGIN}/{ENV_API_KEY} or the "
    "credentials file; never a flag)"
)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    """Flags named after acquire.danbooru keys; unset flags keep the params defaults (argparse.SUPPRESS)."""

    def add(flag: str, dest: str, help: str, **kw: Any) -> None:
        p.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=help, **kw)

    add("--base-url", "base_url", "API origin, http(s) (default https://danbooru.donmai.us)", metavar="URL")
    add("--characters", "characters", "character tags to crawl, comma-separated", type=_csv, metavar="A,B,C")
    add(
        "--top-characters",
        "top_characters",
        "with no --characters: crawl the N character tags with most posts",
        type=int,
        metavar="N",
    )
    add("--max-posts", "max_posts_per_character", "stop a character after N kept posts", type=int, metavar="N")
    add("--ratings", "ratings", "keep these ratings (g,s,q,e)", type=_csv, metavar="g,s")
    add("--exclude-tags", "exclude_tags", "drop posts carrying any of these tags", type=_csv, metavar="X,Y")
    add(
        "--allow-multi-character",
        "single_character",
        "keep posts tagged with several characters (default: exactly one, the DAF:re rule)",
        action="store_false",
    )
    add("--file", "file", "large (large_file_url) or original (file_url)", choices=("large", "original"))
    add("--page-limit", "page_limit", "posts per API page (<= 200)", type=int, metavar="N")
    add("--requests-per-second", "requests_per_second", "request rate over all connections", type=float, metavar="R")
    add("--max-connections", "max_connections", "concurrent connections", type=int, metavar="N")
    add("--cdn-hosts", "cdn_hosts", "hosts images may come from besides the API host", type=_csv, metavar="H1,H2")
    add("--timeout", "timeout_s", "seconds per request (connect and read)", type=float, metavar="S")
    add("--max-retries", "max_retries", "retries of 429/5xx/timeouts/truncated bodies", type=int, metavar="N")
    add(
        "--max-retry-after",
        "max_retry_after_s",
        "a longer Retry-After fails the request instead of waiting",
        type=float,
        metavar="S",
    )
    add("--backoff", "backoff_s", "first retry wait in seconds (doubles, with jitter)", type=float, metavar="S")
    add("--max-file-mb", "max_file_mb", "skip larger files", type=float, metavar="MB")
    add(
        "--credentials-file",
        "credentials_file",
        "login=/api_key= file, relative to the working directory",
        metavar="PATH",
    )


def section_from_cli(args: argparse.Namespace) -> dict[str, Any]:
    """The acquire.danbooru keys given on the command line (the params model validates them)."""
    return {k: getattr(args, k) for k in DanbooruSource.model_fields if hasattr(args, k)}
