"""The rules for ``l3.url`` and ``l3.endpoint``: checked by the
configuration (so that ``kvstore config --effective`` refuses what ``serve``
would) and by the object tier as it opens the store; no I/O. Whether obstore
(the ``l3`` extra) can be imported is checked here too, for the same reason."""

from __future__ import annotations

import ipaddress
import urllib.parse

from kvstore.errors import InvalidConfig

#: What installs obstore: kvstore's ``l3`` extra (pyproject.toml; a test checks
#: the pin). Not ``pip install 'kvstore[l3]'``: on PyPI ``kvstore`` is another project.
L3_EXTRA_INSTALL = "pip install 'obstore>=0.6' (kvstore's l3 extra)"


def obstore_missing(url: str) -> InvalidConfig:
    """The error for an ``l3.url`` set where obstore is not installed."""
    return InvalidConfig(f"L3 is configured (l3.url={url}) but obstore is not installed: "
                         f"{L3_EXTRA_INSTALL}")


def check_credentials(url: str, access_key_id: str, secret_access_key: str) -> None:
    """InvalidConfig unless an S3 ``url`` has both keys or neither (a
    ``file://`` one uses none)."""
    if url.lower().startswith("file:"):
        return
    if bool(access_key_id) != bool(secret_access_key):
        raise InvalidConfig("set both l3.access_key_id and l3.secret_access_key, or neither")


def check_obstore(url: str) -> None:
    """InvalidConfig (:func:`obstore_missing`) unless obstore imports."""
    try:
        import obstore  # noqa: F401  (the optional l3 extra)
    except ModuleNotFoundError as exc:
        if exc.name != "obstore":
            raise
        raise obstore_missing(url) from None


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_location(url: str, endpoint: str) -> None:
    """InvalidConfig naming the option unless ``url`` (and ``endpoint``) can
    name an object store."""
    parsed = urllib.parse.urlsplit(url)
    scheme = parsed.scheme.lower()
    userinfo = url.partition("://")[2].partition("@")
    if "@" in parsed.netloc or (userinfo[1] and ":" in userinfo[0]):
        # (an s3:// one is read as part of the bucket's name; a secret with a
        # "/" in it, as AWS keys have, ends urlsplit's netloc before the "@")
        raise InvalidConfig(
            "l3.url must not carry credentials (user:password@): set l3.access_key_id and "
            "l3.secret_access_key (env KVSTORE_L3_ACCESS_KEY_ID, KVSTORE_L3_SECRET_ACCESS_KEY)")
    if scheme == "file":
        if endpoint:
            raise InvalidConfig("l3.endpoint applies to s3:// URLs only, not file://")
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise InvalidConfig(f"l3.url {url!r}: use file:///absolute/path")
        return
    if scheme not in ("s3", "s3a"):
        raise InvalidConfig(
            f"l3.url {url!r}: unsupported scheme {parsed.scheme!r} "
            "(use s3://bucket/prefix or file:///path)"
        )
    if not parsed.netloc:
        raise InvalidConfig(f"l3.url {url!r}: no bucket (use s3://bucket/prefix)")
    if endpoint:
        ep = urllib.parse.urlsplit(endpoint)
        if ep.scheme not in ("http", "https") or not ep.hostname:
            raise InvalidConfig(f"l3.endpoint {endpoint!r}: use https://host[:port]")
        if ep.scheme == "http" and not is_loopback_host(ep.hostname):
            raise InvalidConfig(
                f"l3.endpoint {endpoint!r}: plain http is allowed only for loopback "
                "endpoints (127.0.0.1, ::1, localhost); use https"
            )
