"""The crawl's journal: one fsynced JSON line per finished download, what a re-run resumes from."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)


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
