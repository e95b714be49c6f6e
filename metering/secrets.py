"""Device keys and API keys: generated here, shown once, stored only as a hash.

A key is 256 bits from the OS's CSPRNG, so SHA-256 of it is as good as a slow password hash
(nothing to brute-force) and lets a lookup by hash use an index.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

DEVICE_KEY_PREFIX = "dmk_"
API_KEY_PREFIX = "dma_"
#: How much of a key is kept in clear, to tell keys apart in a list. 4 + 6 characters.
_SHOWN = 10


@dataclass(frozen=True, slots=True)
class NewSecret:
    plaintext: str
    prefix: str
    digest: bytes

    def __repr__(self) -> str:
        # Keep the plaintext out of logs and tracebacks.
        return f"NewSecret(prefix={self.prefix!r})"


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def new_secret(kind_prefix: str) -> NewSecret:
    plaintext = kind_prefix + secrets.token_urlsafe(32)
    return NewSecret(plaintext, plaintext[:_SHOWN], digest(plaintext))
