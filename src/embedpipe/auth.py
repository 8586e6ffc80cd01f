"""API keys: who is calling, and the limits that come with the key. Knows nothing about HTTP.

Keys come from ``EMBEDPIPE_API_KEYS`` (comma-separated, plain; each is named ``key-<8 hex>``
after its digest) and from a keys file (``EMBEDPIPE_API_KEYS_FILE``, TOML or YAML) that stores
only digests, each with a name and optional per-key limits::

    # keys.toml                                   # keys.yaml
    [[keys]]                                      keys:
    name = "search-team"                            - name: search-team
    hash = "sha256:…"                                 hash: "sha256:…"
    rpm = 600        # optional; 0 = unlimited        rpm: 600
    tpm = 1000000    # optional; absent = default     tpm: 1000000

``embedpipe keys generate`` makes a key and its entry; ``embedpipe keys hash`` hashes one.

API keys are long random tokens, not passwords, so one SHA-256 is the right hash (as for
GitHub's or Stripe's tokens): a slow KDF would only cost CPU on every request, while guessing a
256-bit key from its digest is hopeless either way. A presented key is hashed and compared with
every stored digest in constant time, without stopping at a match. Keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEME = "sha256:"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9._@:-]{1,64}")


class KeysFileError(ValueError):
    """The keys file is missing, unreadable or malformed (raised at start-up)."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One accepted key: its name (the rate-limit identity) and its own limits.

    ``rpm``/``tpm``: None = the server's default (``EMBEDPIPE_RATE_LIMIT_RPM``/``_TPM``),
    0 = unlimited for this key.
    """

    name: str
    digest: bytes
    rpm: int | None = None
    tpm: int | None = None


NAME_RULE = "1-64 characters of A-Z a-z 0-9 . _ @ : -"


def valid_name(name: object) -> bool:
    """A key name: what keys files accept, and all ``keys generate`` writes (never a quote or
    a line break that could add TOML of its own)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def hash_key(key: str) -> str:
    """The digest to store in a keys file: ``sha256:<hex>``."""
    return _SCHEME + hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    """A new random key (256 bits)."""
    return "ep-" + secrets.token_urlsafe(32)


class KeyStore:
    """The keys a server accepts. Empty means authentication is off.

    >>> store = KeyStore.load(api_keys="k1,k2", keys_file=None)
    >>> store.authenticate("k1").name
    'key-…'
    """

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        names = [key.name for key in keys]
        if len(set(names)) != len(names):
            duplicate = next(name for name in names if names.count(name) > 1)
            raise KeysFileError(f"the key name {duplicate!r} is used twice")
        digests = [key.digest for key in keys]
        if len(set(digests)) != len(digests):
            raise KeysFileError("the same key is configured twice")
        self._keys = tuple(keys)

    @classmethod
    def load(cls, api_keys: str, keys_file: Path | None) -> KeyStore:
        keys = [_plain_key(key) for key in _split(api_keys)]
        if keys_file is not None:
            keys += load_keys_file(keys_file)
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[ApiKey]:
        return iter(self._keys)

    def authenticate(self, presented: str) -> ApiKey | None:
        """The key record for ``presented``, or None. Time does not depend on which key
        matched or how much of a digest did."""
        digest = hashlib.sha256(presented.encode()).digest()
        found: ApiKey | None = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _plain_key(key: str) -> ApiKey:
    digest = hashlib.sha256(key.encode()).digest()
    return ApiKey(name=f"key-{digest.hex()[:8]}", digest=digest)


def load_keys_file(path: Path) -> list[ApiKey]:
    """Parse a TOML (``.toml``) or YAML (``.yaml``/``.yml``) keys file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KeysFileError(f"cannot read the keys file {path}: {exc.strerror}") from exc
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            document: Any = tomllib.loads(raw.decode())
        elif suffix in (".yaml", ".yml"):
            import yaml

            document = yaml.safe_load(raw)
        else:
            raise KeysFileError(f"the keys file {path} must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"the keys file {path} is not valid TOML: {exc}") from exc
    except Exception as exc:
        if isinstance(exc, KeysFileError):
            raise
        raise KeysFileError(f"the keys file {path} is not valid YAML: {exc}") from exc
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise KeysFileError(f"the keys file {path} must hold a list named 'keys'")
    return [_entry(entry, index, path) for index, entry in enumerate(document["keys"])]


def _entry(entry: Any, index: int, path: Path) -> ApiKey:
    where = f"{path}: keys[{index}]"
    if not isinstance(entry, Mapping):
        raise KeysFileError(f"{where} must be a table with 'name' and 'hash'")
    unknown = set(entry) - {"name", "hash", "rpm", "tpm"}
    if "key" in unknown:
        raise KeysFileError(
            f"{where} holds a plain 'key': store its digest instead (`embedpipe keys hash`)"
        )
    if unknown:
        raise KeysFileError(f"{where} has unknown fields: {', '.join(sorted(unknown))}")
    name = entry.get("name")
    if not isinstance(name, str) or not valid_name(name):
        raise KeysFileError(f"{where}: 'name' must be {NAME_RULE}")
    digest = entry.get("hash")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest.lower()):
        raise KeysFileError(
            f"{where}: 'hash' must be 'sha256:' and 64 hex digits (`embedpipe keys hash`)"
        )
    limits: dict[str, int | None] = {}
    for field in ("rpm", "tpm"):
        value = entry.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise KeysFileError(f"{where}: '{field}' must be a whole number (0 = unlimited)")
        if value is not None and value < 0:
            raise KeysFileError(f"{where}: '{field}' must not be negative")
        limits[field] = value
    return ApiKey(
        name=name,
        digest=bytes.fromhex(digest.lower().removeprefix(_SCHEME)),
        rpm=limits["rpm"],
        tpm=limits["tpm"],
    )
