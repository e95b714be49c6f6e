"""Device keys and API keys: generated here, shown once, stored only as a hash.

A key is 256 bits from the OS's CSPRNG, so SHA-256 of it is as good as a slow password hash
(nothing to brute-force) and lets a lookup by hash use an index.
"""

from __future__ import annotations

import base64
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


#: Mosquitto's own default for `$7$` password hashes (mosquitto_passwd). The key is 256 random
#: bits, so the iteration count is not what protects it; it only has to be what the broker reads.
BROKER_HASH_ITERATIONS = 101


def broker_hash(key: str, *, salt: bytes | None = None) -> str:
    """``key`` in Mosquitto's password-file form: ``$7$<iterations>$<salt>$<PBKDF2-SHA512>``.

    The broker checks a device's CONNECT password against it; the string itself is no
    credential, so it may sit in the database and in the broker's files.
    """
    salt = secrets.token_bytes(12) if salt is None else salt
    if len(salt) != 12:
        raise ValueError("Mosquitto reads 12-byte salts only")
    dk = hashlib.pbkdf2_hmac("sha512", key.encode(), salt, BROKER_HASH_ITERATIONS, 64)
    salt_text, hash_text = base64.b64encode(salt).decode(), base64.b64encode(dk).decode()
    return f"$7${BROKER_HASH_ITERATIONS}${salt_text}${hash_text}"
