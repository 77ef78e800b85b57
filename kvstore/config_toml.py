"""The configuration written out as TOML, from the declarations in kvstore/config.py.

:func:`example` is the commented example file (``kvstore config --example``,
committed as deploy/kvstore.example.toml); :func:`effective` is a loaded
:class:`~kvstore.config.Config` as a file ``--config`` reads back, with
credentials left out (``kvstore config --effective``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
from collections.abc import Iterator
from typing import Any

from kvstore import config as kvconfig

#: Options whose values never leave the process: printed as a comment saying
#: whether they are set. Option names that contain these words count too.
SECRET_OPTIONS = frozenset({"l3.access_key_id", "l3.secret_access_key"})
_SECRET_WORDS = ("secret", "password", "token", "credential")
#: Paths to files that hold credentials, not credentials: printed like
#: server.tls_key, or the TOML read back would start a server with auth off.
PATH_OPTIONS = frozenset({"auth.tokens_file"})
#: A URL's ``user:password@``; the password may hold "/" (AWS secret keys
#: do). Text with "://", a ":" and an "@" in one word is redacted, even where
#: it was no password (host:port/path@x): better too much than a secret.
_URL_USERINFO_RE = re.compile(r"(?<=://)[^\s/@]*:[^\s@]*@|(?<=://)[^\s/@:]+@")

_SIZE_UNITS = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))
_WIDTH = 92


def is_secret(section: str | None, name: str) -> bool:
    dotted = f"{section}.{name}" if section else name
    if dotted in PATH_OPTIONS:
        return False
    return dotted in SECRET_OPTIONS or any(w in name for w in _SECRET_WORDS)


def toml_value(f: dataclasses.Field[Any], value: Any) -> str:
    """One option's value in TOML, in a form its parser reads back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and f.metadata["parse"] is kvconfig.parse_size:
        for unit, size in _SIZE_UNITS:
            if value and value % size == 0:
                return json.dumps(f"{value // size}{unit}")
        return str(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(json.dumps(str(v)) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _sections() -> Iterator[tuple[str | None, list[dataclasses.Field[Any]]]]:
    grouped: dict[str | None, list[dataclasses.Field[Any]]] = {}
    for section, f in kvconfig._options():
        grouped.setdefault(section, []).append(f)
    yield from grouped.items()


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, _WIDTH - 2, initial_indent="# ", subsequent_indent="# ",
                         break_on_hyphens=False)


def example() -> str:
    """Every option, commented out at its default, with its help, env and flag."""
    lines = [
        "# kvstore configuration: every option, commented out at its default.",
        "# Generated from kvstore/config.py by `kvstore config --example`; do not edit by",
        "# hand (tests/deploy checks it is current).",
        "#",
        "# Use it with `kvstore serve --config FILE` or env KVSTORE_CONFIG=FILE. Sources,",
        "# later ones winning: defaults, this file, env KVSTORE_<SECTION>_<OPTION>, flags",
        "# --<section>-<option>. Sizes take binary units: 4096, 64MiB, 2GiB.",
    ]
    for section, fields in _sections():
        if section:
            lines.extend(("", f"[{section}]"))
        for f in fields:
            lines.append("")
            lines.extend(_comment(f.metadata["help"]))
            lines.append(f"# env {kvconfig._env(section, f.name)}, flag "
                         f"{kvconfig._flag(section, f.name)}")
            lines.append(f"#{f.name} = {toml_value(f, f.default)}")
    return "\n".join(lines) + "\n"


def redact_urls(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it replaced."""
    return _URL_USERINFO_RE.sub("<redacted>@", text)


def _redact_url(value: Any) -> Any:
    return redact_urls(value) if isinstance(value, str) else value


def effective(config: kvconfig.Config) -> str:
    """``config`` as TOML that ``--config`` loads back; credentials are left
    out (a comment says whether each is set)."""
    lines = ["# kvstore effective configuration (defaults < file < env < flags).",
             "# Credentials are not printed."]
    for section, fields in _sections():
        holder: Any = config
        for part in section.split(".") if section else ():  # "policy.session" nests
            holder = getattr(holder, part)
        lines.append("")
        if section:
            lines.append(f"[{section}]")
        for f in fields:
            value = getattr(holder, f.name)
            if is_secret(section, f.name) and value:
                lines.append(f"# {f.name}: set, redacted "
                             f"(env {kvconfig._env(section, f.name)})")
            else:
                lines.append(f"{f.name} = {toml_value(f, _redact_url(value))}")
    return "\n".join(lines) + "\n"
