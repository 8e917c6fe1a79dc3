"""An atomically swappable live object (rule set, model) that is closed only after its last user."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class Live(Generic[T]):
    """Holds the current value; ``use()`` pins it for one decision so a swap never pulls it away.

    After ``swap`` the old value is handed to ``retire`` (e.g. to delete a durable-rules handle) as
    soon as no decision uses it any more.
    """

    def __init__(self, value: T, retire: Callable[[T], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._value = value
        self._users: dict[int, int] = {id(value): 0}
        self._retiring: dict[int, T] = {}
        self._retire = retire

    @property
    def current(self) -> T:
        return self._value

    @contextmanager
    def use(self) -> Iterator[T]:
        with self._lock:
            value = self._value
            self._users[id(value)] = self._users.get(id(value), 0) + 1
        try:
            yield value
        finally:
            self._release(value)

    def _release(self, value: T) -> None:
        with self._lock:
            key = id(value)
            self._users[key] -= 1
            done = self._users[key] == 0 and key in self._retiring
            if done:
                del self._users[key]
                self._retiring.pop(key)
        if done and self._retire:
            self._retire(value)

    def swap(self, value: T) -> T:
        """Make ``value`` current; the previous value is retired once idle. Returns the previous."""
        with self._lock:
            old, self._value = self._value, value
            self._users.setdefault(id(value), 0)
            idle = self._users.get(id(old), 0) == 0
            if idle:
                self._users.pop(id(old), None)
            else:
                self._retiring[id(old)] = old
        if idle and self._retire and old is not value:
            self._retire(old)
        return old
