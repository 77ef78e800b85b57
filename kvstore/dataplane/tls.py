"""TLS contexts of the data plane, client and server side alike."""

from __future__ import annotations

import ssl


def same_checks_as_grpc(ctx: ssl.SSLContext) -> None:
    """The data plane takes the gRPC listener's certificates: it must accept
    what gRPC accepts. Python 3.13's default context adds OpenSSL's strict
    X.509 checks (a CA without a key usage extension, a certificate without
    an authority key identifier: refused), which gRPC does not make, so a
    certificate set that served gRPC failed the data plane on 3.13 only."""
    ctx.verify_flags &= ~ssl.VERIFY_X509_STRICT
