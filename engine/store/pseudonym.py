"""Customer pseudonyms for the logs and the audit trail: a keyed hash (HMAC-SHA256) of the customer id.

Keyed, not a plain hash: customer ids are few and guessable (``C0000000`` .. ``C0019999``), so a plain
hash is reversed by hashing every candidate id. The key is a per-deployment secret kept next to the
Redis password: ``NBA_PSEUDONYM_KEY`` (the secret itself, e.g. from the Kubernetes Secret that holds the
Redis password), or ``NBA_PSEUDONYM_KEY_FILE`` (a file holding it), else ``pseudonym.key`` in the data
directory (``NBA_DATA_DIR``, default ``.nba-data``), made once with mode 0600 beside ``redis.password``.
Every replica must share the key for one customer to carry one pseudonym across the deployment; who
holds the key (and the customer ids) can tell which customer a pseudonym names, nobody else can.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_FILE = "pseudonym.key"


def _key_from_file(path: Path, create: bool) -> bytes:
    if create:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
    key = path.read_text().strip()
    if not key:
        raise ValueError(f"{path}: empty pseudonym key")
    return key.encode()


@functools.cache
def pseudonym_key() -> bytes:
    """The deployment's pseudonym key (see the module's docstring)."""
    if value := os.environ.get("NBA_PSEUDONYM_KEY", "").strip():
        return value.encode()
    if file := os.environ.get("NBA_PSEUDONYM_KEY_FILE", "").strip():
        return _key_from_file(Path(file), create=False)
    return _key_from_file(Path(os.environ.get("NBA_DATA_DIR", ".nba-data")) / KEY_FILE, create=True)


def pseudonym(customer_id: str) -> str:
    """``p:`` and 24 hex digits (96 bits) of HMAC-SHA256(key, customer id): stable per deployment."""
    return "p:" + hmac.new(pseudonym_key(), customer_id.encode(), hashlib.sha256).hexdigest()[:24]


__all__ = ["pseudonym", "pseudonym_key"]
