"""Certificates made by openssl for the TLS tests: certificate authorities and
the server and client certificates they sign (EC keys: quick to make)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="openssl is not installed")

_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str, days: int = 2) -> Path:
    """``d/<name>.pem`` (and ``.key``), a self-signed CA; returns the .pem."""
    openssl(d, "req", "-x509", *_EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem",
            "-days", str(days), "-subj", f"/CN={name}")
    return d / f"{name}.pem"


def make_leaf(d: Path, ca: str, name: str, san: str, days: int = 2) -> tuple[Path, Path]:
    """``d/<name>.pem`` and ``.key`` signed by the CA ``d/<ca>.pem``, with
    subject CN ``name`` and subjectAltName ``san`` (e.g. ``IP:127.0.0.1``)."""
    openssl(d, "req", *_EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", str(days), "-extfile",
            f"{name}.ext")
    return d / f"{name}.pem", d / f"{name}.key"


def make_intermediate(d: Path, ca: str, name: str, days: int = 2) -> Path:
    """``d/<name>.pem`` (and ``.key``), a CA signed by the CA ``d/<ca>.pem``."""
    openssl(d, "req", *_EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
    (d / f"{name}.ext").write_text("basicConstraints=critical,CA:TRUE\n"
                                   "keyUsage=critical,keyCertSign,cRLSign\n")
    openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", str(days), "-extfile",
            f"{name}.ext")
    return d / f"{name}.pem"
