"""Watch the rule files and reload when they change: the file-watch half of hot reload.

Polls a digest of the rule files (``rules/*.yaml``, ``rules/tests/*.yaml`` and ``rules/campaigns/*.yaml``, names and bytes) and
calls ``on_change`` once the files have settled (two polls agree), so an editor that writes a file in
several steps triggers one reload. Polling needs no dependency and works on every file system
(network and container mounts included); the cost is reading a few small files once a second.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from engine.authoring.ruletests import TESTS_DIR
from engine.rules.campaigns import CAMPAIGNS_DIR

log = logging.getLogger(__name__)


def files_digest(rules_dir: Path) -> str:
    """A digest of every rule and rule-test file's name and bytes."""
    rules_dir = Path(rules_dir)
    digest = hashlib.sha256()
    for path in sorted([*rules_dir.glob("*.yaml"), *(rules_dir / TESTS_DIR).glob("*.yaml"),
                        *(rules_dir / CAMPAIGNS_DIR).glob("*.yaml")]):
        try:
            data = path.read_bytes()
        except OSError as err:  # deleted or replaced between glob and read: a change in progress
            data = f"unreadable: {err}".encode()
        digest.update(str(path.relative_to(rules_dir)).encode() + b"\0" + data + b"\0")
    return digest.hexdigest()


class RuleWatcher:
    """Calls ``on_change()`` from a background thread after the files in ``rules_dir`` change."""

    def __init__(self, rules_dir: Path, interval: float, on_change: Callable[[], object],
                 seen: str | None = None):
        self.rules_dir = Path(rules_dir)
        self.interval = interval
        self.on_change = on_change
        self.seen = seen if seen is not None else files_digest(self.rules_dir)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rules-watch", daemon=True)

    def start(self) -> RuleWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = files_digest(self.rules_dir)
            if now == self.seen:
                continue
            while not self._stop.wait(min(self.interval, 0.25)):  # let the writes settle
                again = files_digest(self.rules_dir)
                if again == now:
                    break
                now = again
            if self._stop.is_set():
                return
            self.seen = now
            log.info("rule files changed in %s: reloading", self.rules_dir)
            try:
                self.on_change()
            except Exception:  # a reload must never kill the watcher
                log.exception("rule reload failed")
