"""The `danbooru` acquisition source: a polite, resumable crawler for the Danbooru JSON API.

Flow: character tags (given, or the top N from /tags.json) -> /posts.json pages per character, newest first (page 1,
then the `b<id>` cursor) -> filters on the metadata (rating, excluded tags, exactly one character) -> checks that need
no download (a file URL, an allowed host, an allowed extension, an md5 not kept yet) -> download (concurrent,
rate-limited, retried) -> checks on the bytes (Content-Type, size; md5 and file_size whenever the file is the
original, retried once; decodes as an image) -> journal -> manifest.

Determinism: posts are committed in API order, batch by batch, so what is kept (which of two equal files wins, where
max_posts_per_character stops) does not depend on download timing.

Resuming: each finished download (a kept file or rejected bytes) is one fsynced line of out/journal.jsonl. A re-run
asks the API again (cheap) but takes finished posts from the journal instead of downloading them, so a crawl killed at
any moment and run again gives the manifest an uninterrupted crawl gives. Downloads that fail after their retry budget
are not journaled: the next run tries them again.

Credentials (optional; anonymous crawling works with lower limits): DANBOORU_LOGIN / DANBOORU_API_KEY, or `login=`
and `api_key=` lines in acquire.danbooru.credentials_file. They travel only as an HTTP basic-auth header to the API
host, never in a URL, so no log line, exception, journal or manifest can contain them.

Modules: client (credentials, rate limit, the retrying GET), posts (the API's post fields, filters, what to fetch
and the checks on the bytes), journal (finished downloads), crawl (the loop and the manifest), cli (the flags of
`python -m pipeline acquire danbooru`).
"""

from pipeline.data.danbooru.cli import CLI_HELP, add_cli_arguments, section_from_cli
from pipeline.data.danbooru.client import FetchError
from pipeline.data.danbooru.crawl import CrawlError, from_danbooru

__all__ = ["CLI_HELP", "CrawlError", "FetchError", "add_cli_arguments", "from_danbooru", "section_from_cli"]
