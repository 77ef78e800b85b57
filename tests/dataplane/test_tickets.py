"""OpenDataPlane's tickets: single use, short-lived, bounded in number."""

from __future__ import annotations

import pytest

from kvstore.dataplane import tickets
from kvstore.dataplane.tickets import Binding, TicketBook
from kvstore.errors import Unauthenticated


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_ticket_is_good_once_and_carries_its_binding() -> None:
    book = TicketBook(1000, Clock())
    binding = Binding("alice", frozenset({"chat"}), "owner-1")
    ticket = book.issue(binding)
    assert len(ticket) == 32 and book.issue(binding) != ticket
    assert book.redeem(ticket) == binding
    with pytest.raises(Unauthenticated, match="already used"):
        book.redeem(ticket)
    assert binding.allows("chat") and not binding.allows("other")
    assert Binding("", None, "o").allows("anything")


def test_a_ticket_expires() -> None:
    clock = Clock()
    book = TicketBook(1000, clock)
    ticket = book.issue(Binding("a", None, "o"))
    clock.now += 1.001
    with pytest.raises(Unauthenticated, match="expired"):
        book.redeem(ticket)
    with pytest.raises(Unauthenticated):  # and it is gone
        book.redeem(ticket)


def test_unused_tickets_do_not_pile_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tickets, "MAX_OUTSTANDING", 10)
    clock = Clock()
    book = TicketBook(1000, clock)
    issued = [book.issue(Binding("a", None, "o")) for _ in range(25)]
    assert book.outstanding == 10
    with pytest.raises(Unauthenticated):
        book.redeem(issued[0])  # the oldest made room
    assert book.redeem(issued[-1]).identity == "a"
    clock.now += 2  # expired ones go at the next issue
    book.issue(Binding("b", None, "o"))
    assert book.outstanding == 1


def test_where_the_data_plane_listens() -> None:
    from kvstore.config import load
    from kvstore.dataplane.server import listen_addresses

    def where(**env: str) -> tuple[str, str]:
        return listen_addresses(load(env={f"KVSTORE_SERVER_{k.upper()}": v
                                          for k, v in env.items()}))

    assert where(listen="10.0.0.5:50051", unix_socket="/run/k.sock") == \
        ("10.0.0.5:0", "/run/k.sock.dp")
    assert where(listen="[::1]:7000") == ("[::1]:0", "")
    assert where(listen="", unix_socket="/run/k.sock") == ("", "/run/k.sock.dp")
    assert where(data_plane_listen="off", data_plane_unix="off", unix_socket="/r.sock") == \
        ("", "")
    assert where(data_plane_listen="0.0.0.0:9000", data_plane_unix="/tmp/dp.sock") == \
        ("0.0.0.0:9000", "/tmp/dp.sock")
