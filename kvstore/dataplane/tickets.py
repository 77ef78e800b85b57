"""The tickets OpenDataPlane hands out: single use, short-lived, bound.

A ticket is 32 random bytes naming what the authenticated gRPC call
established: the caller's identity, the namespaces it may use and the
shared-memory owner its session acts as. The data-plane connection that
presents it in HELLO inherits exactly that; a ticket used once, expired or
never issued is refused (Unauthenticated).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from kvstore.errors import Unauthenticated

TICKET_BYTES = 32
#: Outstanding tickets kept at most (the oldest are dropped first): a
#: caller that opens sessions it never uses cannot grow the table for ever.
MAX_OUTSTANDING = 65_536


@dataclass(frozen=True, slots=True)
class Binding:
    """What a session may do. ``namespaces`` None: every namespace (auth off,
    or a ``*`` grant); ``identity`` "" when auth is off."""

    identity: str
    namespaces: frozenset[str] | None
    owner: str
    #: what authenticated the OpenDataPlane call (kvstore.server.auth's
    #: Credential; () when auth is off): a reload of the grants keeps the
    #: sessions whose credential still has the same grant.
    credential: tuple[str, ...] = ()

    def allows(self, namespace: str) -> bool:
        return self.namespaces is None or namespace in self.namespaces


class TicketBook:
    def __init__(self, ticket_ms: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ticket_ms = ticket_ms
        self.clock = clock
        self._tickets: OrderedDict[bytes, tuple[float, Binding]] = OrderedDict()

    def clear(self, keep: Callable[[Binding], bool] | None = None) -> int:
        """Forget the tickets not yet redeemed (the grants changed), all of
        them or those whose binding ``keep`` refuses; how many."""
        tickets = self._tickets
        if keep is None:
            n = len(tickets)
            tickets.clear()
            return n
        gone = [t for t, (_, binding) in tickets.items() if not keep(binding)]
        for t in gone:
            del tickets[t]
        return len(gone)

    def issue(self, binding: Binding) -> bytes:
        now = self.clock()
        tickets = self._tickets
        while tickets and (len(tickets) >= MAX_OUTSTANDING
                           or next(iter(tickets.values()))[0] < now):
            tickets.popitem(last=False)  # expired (issued in order) or too many
        ticket = secrets.token_bytes(TICKET_BYTES)
        tickets[ticket] = (now + self.ticket_ms / 1000.0, binding)
        return ticket

    def redeem(self, ticket: bytes) -> Binding:
        """The ticket's binding; it cannot be used again."""
        held = self._tickets.pop(bytes(ticket), None)
        if held is None:
            raise Unauthenticated("data plane ticket unknown or already used: call "
                                  "OpenDataPlane for a new one (each is good for one "
                                  "connection)")
        expires, binding = held
        if self.clock() > expires:
            raise Unauthenticated(f"data plane ticket expired (tickets live {self.ticket_ms} "
                                  "ms, server.data_plane_ticket_ms): call OpenDataPlane again")
        return binding

    @property
    def outstanding(self) -> int:
        return len(self._tickets)
