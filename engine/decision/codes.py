"""Small integer codes for the texts that decision records repeat (what an action was presented as, the
decision's channel and versions), from one append-only dictionary in Redis, ``nba:codes``.

A code is never reassigned: the dictionary only grows (a rule reload or a new model version adds codes,
it changes none), every process and replica reads the same hash, and an allocation is acknowledged by a
replica before it is used (``replicated``), so a failover cannot hand the same code to another text.
Fields: ``v:<text>`` -> code, ``c:<code>`` -> text, ``next`` the last code given. It grows with the
distinct texts (actions x channels x versions x budget days), not with traffic.
"""

from __future__ import annotations

import threading
from typing import Any

from engine.errors import NbaError
from engine.store.profiles import replicated

CODES_KEY = "nba:codes"

# KEYS[1] the dictionary; ARGV[1] a text. Its code, given now if it had none.
_ALLOCATE = """
local c = redis.call('HGET', KEYS[1], 'v:' .. ARGV[1])
if c then return c end
c = redis.call('HINCRBY', KEYS[1], 'next', 1)
redis.call('HSET', KEYS[1], 'v:' .. ARGV[1], c, 'c:' .. c, ARGV[1])
return tostring(c)
"""


class UnknownCode(NbaError, LookupError):
    """A stored record names a code the dictionary does not have (``nba:codes`` lost or edited)."""


class Codes:
    """The dictionary with a process-local cache (codes never change, so the cache is never stale)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._code: dict[str, str] = {}
        self._text: dict[str, str] = {}
        self._lock = threading.Lock()

    def code(self, text: str) -> str:
        found = self._code.get(text)
        if found is not None:
            return found
        reply = replicated(self.client, CODES_KEY, "EVAL", _ALLOCATE, 1, CODES_KEY, text, operation="codes")
        code = reply.decode() if isinstance(reply, bytes) else str(reply)
        with self._lock:
            self._code[text] = code
            self._text[code] = text
        return code

    def text(self, code: str) -> str:
        found = self._text.get(code)
        if found is not None:
            return found
        raw = self.client.hget(CODES_KEY, f"c:{code}")
        if raw is None:
            raise UnknownCode(f"nba:codes: no text for code {code!r} (the dictionary of decision records is "
                              "missing or was edited)")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        with self._lock:
            self._text[code] = text
            self._code[text] = code
        return text
