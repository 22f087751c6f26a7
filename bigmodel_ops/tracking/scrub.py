"""Secrets never reach the tracking store: what a run logs is scrubbed first.

A :class:`Scrubber` masks, in every param, tag, text artifact and model card:

- credentials in URIs: ``postgresql://user:pass@host`` -> ``postgresql://user:***@host``,
  ``https://token@host`` -> ``https://***@host``, and ``?password=...`` / ``&token=...`` query values;
- the value of a secret-named key (``*password*``, ``*passwd*``, ``*secret*``, ``*credential*``, a
  ``token`` word such as ``hf_token`` or ``access_token``, and ``*_key`` / ``*apikey*``), matched on
  the last part of a dotted key; ``special_tokens``, ``max_tokens`` or ``flops_per_token`` are not
  secret names;
- anywhere in text, every secret value found that way in the params it was built from, in the
  environment and in what was logged before (at least 6 characters), so a value copied into a
  report is masked too.

Files logged as artifacts are scanned when they are at most :data:`MAX_SCAN_BYTES`; a file that
holds a secret is logged as a masked copy. Larger files (model weights, data) are not read.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MASK = "***"
MAX_SCAN_BYTES = 5_000_000
_MIN_SECRET_LEN = 6  # shorter values (and the words below) are too common to replace in any text
_NOT_SECRETS = {"false", "true", "none", "null", "changeme"}
_URI_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^\s/@:]*)(?P<pw>:[^\s/@]*)?@")
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&;][^=&\s]*(?:password|passwd|secret|token|api_?key|access_?key)[^=&\s]*=)[^&\s#]+", re.I
)


def is_secret_key(key: str) -> bool:
    """True for a key whose value is a credential (see the module docstring); ``a.b.db_password``
    is judged by ``db_password``."""
    last = str(key).rsplit(".", 1)[-1].lower()
    if any(word in last for word in ("password", "passwd", "secret", "credential", "apikey")):
        return True
    words = re.split(r"[^a-z0-9]+", last)
    # A unit such as flops_per_token is not a credential.
    return last.endswith("_key") or any(
        w == "token" and words[i - 1 : i] != ["per"] for i, w in enumerate(words)
    )


def mask_uris(text: str) -> str:
    """Mask the password (or a lone token) of every ``scheme://userinfo@`` and secret query values."""

    def userinfo(match: re.Match[str]) -> str:
        if match["pw"] is not None:
            return f"{match['scheme']}{match['user']}:{MASK}@"
        return f"{match['scheme']}{MASK}@" if match["user"] else match[0]

    return _QUERY_SECRET.sub(lambda m: m["key"] + MASK, _URI_USERINFO.sub(userinfo, text))


class Scrubber:
    """Masks secrets in what is about to be logged. ``Scrubber(params)`` also learns the secret
    values of ``params`` (any nesting of mappings and lists) and of the environment."""

    def __init__(self, *sources: Any, environ: Mapping[str, str] | None = None) -> None:
        self.secrets: list[str] = []
        for source in (*sources, dict(os.environ if environ is None else environ)):
            self.learn(source)

    def learn(self, source: Any, key: str = "") -> None:
        """Remember the secret values in ``source`` (a value under ``key``, or nested mappings)."""
        found: set[str] = set(self.secrets)
        _collect(source, key, found)
        found = {s for s in found if len(s) >= _MIN_SECRET_LEN and s.lower() not in _NOT_SECRETS}
        self.secrets = sorted(found, key=len, reverse=True)

    def text(self, text: str) -> str:
        """``text`` with URI credentials and every known secret value (also those met in text) masked."""
        if "@" in text:
            self.learn(text)
        text = mask_uris(text)
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def value(self, key: str, value: Any) -> Any:
        """The value to log under ``key``: masked whole for a secret-named key (which is then
        masked in any later text too), else scrubbed text."""
        if is_secret_key(key) and value not in (None, "", True, False):
            self.learn(value, key)
            return MASK
        return self.text(value) if isinstance(value, str) else value

    def mapping(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return {key: self.value(key, value) for key, value in values.items()}

    def path(self, local: Path, workdir: str) -> Path:
        """``local`` itself, or (when a file of it holds a secret) a masked copy under ``workdir``."""
        files = [local] if local.is_file() else [p for p in local.rglob("*") if p.is_file()]
        dirty = [f for f in files if self._needs_scrub(f)]
        if not dirty:
            return local
        copy = Path(workdir) / local.name
        if local.is_dir():
            shutil.copytree(local, copy)
        for file in dirty:
            target = copy if local.is_file() else copy / file.relative_to(local)
            target.write_text(self.text(file.read_text(encoding="utf-8", errors="replace")), encoding="utf-8")
        return copy

    def _needs_scrub(self, file: Path) -> bool:
        try:
            if file.stat().st_size > MAX_SCAN_BYTES:
                return False
            text = file.read_bytes().decode("utf-8", errors="replace")
        except OSError:
            return False
        return self.text(text) != text


def _collect(node: Any, key: str, found: set[str]) -> None:
    if isinstance(node, Mapping):
        for child_key, child in node.items():
            _collect(child, f"{key}.{child_key}" if key else str(child_key), found)
    elif isinstance(node, list | tuple):
        for child in node:
            _collect(child, key, found)
    elif isinstance(node, str | int | float) and not isinstance(node, bool):
        text = str(node)
        if is_secret_key(key):
            found.add(text)
        for match in _URI_USERINFO.finditer(text):  # the password, or a lone token
            found.add(match["pw"][1:] if match["pw"] is not None else match["user"])
