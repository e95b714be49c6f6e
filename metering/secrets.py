"""Device keys and API keys: generated here, shown once, stored only as a hash.

A key is 256 bits from the OS's CSPRNG, so SHA-256 of it is as good as a slow password hash
(nothing to brute-force) and lets a lookup by hash use an index.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass

import bcrypt

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


#: bcrypt's cost for device keys at NATS (``$2a$04$``: 2^4 rounds, the least bcrypt allows).
#: A cost slows down guessing a *password*; a device key is 256 random bits, so guessing it is
#: out of reach at any cost, and nothing a higher one adds would be felt by an attacker. It is
#: felt by us, three times over: every registration and rotation hashes once (measured with
#: bcrypt 5.0 on this shared 2-core machine, load average ~4: cost 4 ~980 hashes/s, 1.0 ms;
#: cost 6 ~260/s; cost 10, what NATS's own mkpasswd uses, ~16/s, 62 ms; Mosquitto's ``$7$``
#: ~17,000/s), so 100,000 devices cost ~100 s of CPU at 4 and ~1.7 h at 10; nats-server checks
#: the hash at every CONNECT (a whole fleet reconnecting after a node restart); and at every
#: reload it checks every connected client's password again.
NATS_BCRYPT_COST = 4
#: bcrypt reads only the first 72 bytes of a password (bcrypt 5 refuses longer ones).
_BCRYPT_MAX = 72


def nats_hash(key: str, *, cost: int = NATS_BCRYPT_COST) -> str:
    """``key`` as nats-server reads a password: bcrypt, ``$2a$<cost>$<salt+hash>``.

    ``$2a$`` rather than the library's default ``$2b$``: the two differ only for passwords
    over 255 bytes, and ``$2a$`` is the form NATS documents and every NATS release recognises.
    Like ``broker_hash``, the result is no credential and may be stored and written to files.
    """
    raw = key.encode()
    if len(raw) > _BCRYPT_MAX:
        raise ValueError(f"bcrypt reads at most {_BCRYPT_MAX} bytes of a password")
    return bcrypt.hashpw(raw, bcrypt.gensalt(cost, prefix=b"2a")).decode()
