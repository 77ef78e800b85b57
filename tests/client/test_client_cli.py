"""The kvstore command: key parsing, argument wiring, output (fake server)."""

from __future__ import annotations

import argparse
import io
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from kvstore_client_fake import FakeServer

from kvstore import cli
from kvstore.config import Config
from kvstore.types import StoreStats, TierName, TierStats


@pytest.mark.parametrize(("text", "key"), [
    ("prefix-0", b"prefix-0"),
    ("hex:00ff10", b"\x00\xff\x10"),
    ("HEX:ABCD", b"\xab\xcd"),
    ("héllo", "héllo".encode()),
    ("\udcff", b"\xff"),  # an undecodable argv byte comes back as itself
])
def test_parse_key(text: str, key: bytes) -> None:
    assert cli.parse_key(text) == key


@pytest.mark.parametrize("bad", ["hex:abc", "hex:zz"])
def test_parse_key_rejects_bad_hex(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_key(bad)


@pytest.mark.parametrize("key", [b"plain", b"\x00\x01", "ünï".encode(), b"hex:abcd", b"a\nb"])
def test_format_key_roundtrips(key: bytes) -> None:
    assert cli.parse_key(cli.format_key(key)) == key


def test_bad_hex_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["get", "--namespace", "ns", "hex:xyz"])
    assert info.value.code == 2
    assert "hex digits" in capsys.readouterr().err


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "serve" in capsys.readouterr().err


def test_serve_help_lists_every_option_with_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--ready-file", "--config", "--server-listen", "--l1-capacity", "--l2-enabled",
                 "--data-dir"):
        assert flag in out
    assert out.count("[default:") >= 20


def test_serve_bad_config_exits_2(capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVSTORE_CONFIG", raising=False)
    assert cli.main(["serve", "--l1-capacity", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvstore: ") and "lots" in err


def test_serve_runs_the_app(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[Config, str | None]] = []
    fake = types.ModuleType("kvstore.server.app")
    fake.run = lambda config, ready_file=None, reload=None: calls.append((config, ready_file)) or 0  # type: ignore[attr-defined]
    import kvstore.server

    monkeypatch.setitem(sys.modules, "kvstore.server.app", fake)
    monkeypatch.setattr(kvstore.server, "app", fake, raising=False)
    monkeypatch.delenv("KVSTORE_CONFIG", raising=False)
    ready = str(tmp_path / "ready.json")
    assert cli.main(["serve", "--ready-file", ready, "--l1-capacity", "64MiB",
                     "--server-listen", "127.0.0.1:0"]) == 0
    [(config, ready_file)] = calls
    assert ready_file == ready
    assert config.l1.capacity == 64 << 20 and config.server.listen == "127.0.0.1:0"


def test_put_get_stats(fake_server: FakeServer, tmp_path: Path,
                       capsysbinary: pytest.CaptureFixture[bytes],
                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTORE_TARGET", fake_server.target)
    src = tmp_path / "block.bin"
    src.write_bytes(b"\x00\x01payload" * 1000)
    assert cli.main(["put", "--namespace", "ns", "--ack", "local", "hex:0a0b", str(src)]) == 0
    capsysbinary.readouterr()
    # stdout
    assert cli.main(["get", "-n", "ns", "hex:0a0b"]) == 0
    assert capsysbinary.readouterr().out == src.read_bytes()
    # file
    dst = tmp_path / "out.bin"
    assert cli.main(["get", "-n", "ns", "hex:0a0b", "-o", str(dst)]) == 0
    assert dst.read_bytes() == src.read_bytes()
    # stdin
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(b"from stdin")))
    assert cli.main(["put", "-n", "ns", "text-key"]) == 0
    capsysbinary.readouterr()
    assert cli.main(["get", "-n", "ns", "text-key", "-o", "-"]) == 0
    assert capsysbinary.readouterr().out == b"from stdin"
    # miss
    assert cli.main(["get", "-n", "ns", "absent"]) == 1
    assert b"not found" in capsysbinary.readouterr().err
    # stats, table and JSON
    assert cli.main(["stats"]) == 0
    table = capsysbinary.readouterr().out.decode()
    assert "L1" in table and "L2" in table and "policy lru" in table
    assert cli.main(["stats", "--json", "--target", fake_server.target]) == 0
    doc = json.loads(capsysbinary.readouterr().out)
    assert doc["tiers"][0]["tier"] == "L1" and doc["tiers"][0]["blocks"] == 2
    assert doc["policy"] == "lru"


def test_errors_exit_1(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVSTORE_TARGET", raising=False)
    assert cli.main(["stats", "--target", "127.0.0.1:1", "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kvstore: ConnectionFailed: ") and "127.0.0.1:1" in err
    assert cli.main(["get", "--target", "127.0.0.1:1", "-n", "ns", "hex:" + "00" * 65]) == 1
    assert capsys.readouterr().err.startswith("kvstore: InvalidKey: ")
    assert cli.main(["put", "-n", "ns", "k", str(tmp_path / "nope")]) == 1
    assert "No such file" in capsys.readouterr().err


def test_namespace_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTORE_NAMESPACE", "from-env")
    args = cli.build_parser().parse_args(["get", "k"])
    assert args.namespace == "from-env"
    monkeypatch.delenv("KVSTORE_NAMESPACE")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["get", "k"])


def test_format_stats() -> None:
    stats = StoreStats(tiers=[TierStats(TierName.L1, blocks=3, bytes=3 << 20, capacity=1 << 30,
                                        hits=10, misses=2, used=4 << 20)],
                       puts=3, gets=12, get_hits=10, policy="session")
    text = cli.format_stats(stats)
    assert "3.0 MiB" in text and "1.0 GiB" in text and "0.4%" in text and "83.3%" in text
    # A server before 0.28.0 says nothing of the capacity taken: not its payload bytes.
    old = StoreStats(tiers=[TierStats(TierName.L1, blocks=3, bytes=3 << 20, capacity=1 << 30)])
    assert " n/a " in cli.format_stats(old)
    assert "n/a" in cli.format_namespace_stats(
        StoreStats(tiers=old.tiers, namespace="ns")).splitlines()[1]
    assert text.splitlines()[1].endswith(" up") and "unavailable" not in text
    down = StoreStats(tiers=[TierStats(TierName.L1), TierStats(TierName.L3, available=False)])
    text = cli.format_stats(down)  # a tier that is down says so (the table hid it)
    assert text.splitlines()[2].endswith("DOWN") and "unavailable: L3" in text
    assert "kvstore health --service kvstore.v1.KVStore/L3" in text
    doc: dict[str, Any] = cli.stats_to_json(stats)
    assert json.loads(json.dumps(doc))["tiers"][0]["tier"] == "L1"
