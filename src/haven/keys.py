"""The project secret and the keyed primitives built on it.

Every pseudonym in haven is an HMAC-SHA256 of the original value under a secret
key, so that nobody without the key can confirm a guess (a plain hash of a
patient id falls to a dictionary attack).  The key is read from a file or an
environment variable and is never written to outputs, logs or MLflow.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path

MIN_KEY_BYTES = 16


class KeyError_(RuntimeError):
    """The project key is missing or unusable."""


def load_key(key_file: str | os.PathLike | None = None, key_env: str | None = None) -> bytes:
    """Return the secret key from ``key_env`` (if set in the environment) or ``key_file``."""
    if key_env and os.environ.get(key_env):
        key = os.environ[key_env].encode()
    elif key_file:
        path = Path(key_file)
        if not path.is_file():
            raise KeyError_(
                f"key file {path} not found: create one with "
                f"`haven keygen {path}` (keep it outside the results folder) "
                f"or set the environment variable named by `key_env` in the config"
            )
        key = path.read_bytes().strip()
    else:
        raise KeyError_("no key configured: set `key_file` or `key_env` in the config")
    if len(key) < MIN_KEY_BYTES:
        raise KeyError_(f"the key is too short ({len(key)} bytes); use at least {MIN_KEY_BYTES}")
    return key


def stage_key(key_file: str | os.PathLike | None, key_env: str | None, demo_key: bool = False) -> bytes:
    """The key a stage runs with (its settings' ``key_file``, ``key_env``, ``demo_key``): a demo
    project creates its key file on first use, unless the key comes from the environment."""
    if demo_key and key_file and not (key_env and os.environ.get(key_env)):
        create_key(key_file)
    return load_key(key_file, key_env)


def create_key(path: str | os.PathLike) -> Path:
    """Write a new random key to ``path`` (mode 0600) unless one already exists.

    Safe when several jobs start at once (the anonymize shards of a demo): the key is written
    whole under a private name and linked into place, so the first job's key wins, none fails,
    and no job ever reads a half-written key.
    """
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:  # another job created it first: use that one
            pass
        except OSError:  # a file system without hard links: create it exclusively instead
            try:
                with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
                    fh.write(Path(tmp).read_text())
            except FileExistsError:
                pass
    finally:
        os.unlink(tmp)
    return path


def digest(key: bytes, purpose: str, value: str) -> bytes:
    """HMAC-SHA256 of ``value`` under ``key``, separated by ``purpose`` (domain separation)."""
    # surrogateescape: a value from a file name that is not UTF-8 hashes as its bytes; valid text as before
    return hmac.new(key, f"{purpose}\x00{value}".encode("utf-8", "surrogateescape"), hashlib.sha256).digest()


def pseudonym(key: bytes, value: str, prefix: str = "P", length: int = 12) -> str:
    """A short, stable, keyed pseudonym such as ``P3F9A0C1D2E4B``."""
    return prefix + digest(key, "pseudonym", value).hex()[:length].upper()


def image_stem(key: bytes, rel: str) -> str:
    """The de-identified name (without suffix) of an image at ``rel`` in its source: anonymize writes
    it there, and the predictions are joined back to the original through it."""
    return pseudonym(key, rel, prefix="I", length=16)


def uid(key: bytes, original: str) -> str:
    """Map a DICOM UID to a ``2.25.<int>`` UID derived from a keyed UUID (ISO/IEC 9834-8).

    The HMAC is truncated to 128 bits and stamped with the RFC 4122 variant and
    version 8 (custom) bits, so the result is a valid UUID as 2.25 requires.
    The same original always yields the same new UID under the same key.
    """
    n = int.from_bytes(digest(key, "uid", original)[:16], "big")
    n &= ~(0xC000 << 48)  # variant: RFC 4122 (10xx)
    n |= 0x8000 << 48
    n &= ~(0xF000 << 64)  # version: 8 (custom)
    n |= 0x8000 << 64
    return f"2.25.{n}"


def day_shift(key: bytes, patient: str, max_days: int | None = None) -> int:
    """A per-patient date shift in days, in [-max_days, -1], derived from the key (``max_days``:
    ``anonymize.max_shift_days``, the schema's default when not given)."""
    if max_days is None:
        from haven.config import section_defaults

        max_days = section_defaults("anonymize")["max_shift_days"]
    n = int.from_bytes(digest(key, "dateshift", patient)[:8], "big")
    return -(1 + n % max_days)
