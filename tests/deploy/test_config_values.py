"""Values no server can use are refused at load, naming the option; and
`kvstore config --effective` prints auth.tokens_file (a path, not a secret)
so that the TOML it prints starts the same server."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore import cli
from kvstore.config import load
from kvstore.errors import InvalidConfig


@pytest.mark.parametrize(("variable", "value", "named"), [
    ("KVSTORE_SERVER_WORKERS", "0", "server.workers must be at least 1, not 0"),
    ("KVSTORE_SERVER_GRACE_SECONDS", "-5", "server.grace_seconds must be >= 0, not -5"),
    ("KVSTORE_SERVER_MAX_LEASE_MS", "-1", "server.max_lease_ms must be >= 0, not -1"),
    ("KVSTORE_SERVER_MAX_PIN_MS", "-1", "server.max_pin_ms must be >= 0"),
    ("KVSTORE_SERVER_SHM_LEASE_MS", "-1", "server.shm_lease_ms must be >= 0"),
    ("KVSTORE_SERVER_SHM_RESERVE_MS", "-1", "server.shm_reserve_ms must be >= 0"),
    ("KVSTORE_SERVER_SHM_QUARANTINE_MS", "-1", "server.shm_quarantine_ms must be >= 0"),
    ("KVSTORE_SERVER_NAMESPACES", "chat,bad ns!", "server.namespaces: namespace 'bad ns!'"),
    ("KVSTORE_SERVER_NAMESPACES", "-x", "server.namespaces: namespace '-x'"),
    ("KVSTORE_SERVER_SHM_NAMESPACES", "a/b", "server.shm_namespaces: namespace 'a/b'"),
    ("KVSTORE_L3_DRAIN_CONCURRENCY", "0", "l3.drain_concurrency must be at least 1, not 0"),
    ("KVSTORE_L3_WRITE_QUEUE_BYTES", "0", "l3.write_queue_bytes must be positive"),
    ("KVSTORE_L2_BATCH_BYTES", "0", "l2.batch_bytes must be positive, not 0"),
    ("KVSTORE_L2_INITIAL_MAP_SIZE", "0", "l2.initial_map_size must be positive, not 0"),
])
def test_unusable_values_are_refused_naming_the_option(variable: str, value: str,
                                                       named: str) -> None:
    with pytest.raises(InvalidConfig) as caught:
        load(env={variable: value})
    assert named in str(caught.value)


@pytest.mark.parametrize("value", ["2.7", "true", "4.0"])
def test_an_int_option_refuses_a_toml_float_or_bool(tmp_path: Path, value: str) -> None:
    """int() would read 2.7 as 2 and true as 1."""
    file = tmp_path / "kvstore.toml"
    file.write_text(f"[server]\nworkers = {value}\n")
    with pytest.raises(InvalidConfig, match=rf"server.workers \(from config file .*\): "
                                            rf"{value.capitalize()} is not an integer"):
        load(file=file, env={})


def test_the_values_at_the_edges_still_load(tmp_path: Path) -> None:
    file = tmp_path / "kvstore.toml"
    file.write_text('[server]\nworkers = 1\ngrace_seconds = 0\nmax_lease_ms = 0\n'
                    'namespaces = ["chat", "code.v2:7b"]\n[l3]\ndrain_concurrency = 1\n')
    config = load(file=file, env={})
    assert config.server.workers == 1 and config.server.namespaces == ("chat", "code.v2:7b")


def test_effective_prints_the_tokens_file_and_reads_back_with_auth_on(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KVSTORE_CONFIG", "KVSTORE_AUTH_TOKENS_FILE"):
        monkeypatch.delenv(name, raising=False)
    tokens = tmp_path / "tokens"
    tokens.write_text("")
    original = tmp_path / "original.toml"
    original.write_text(f'[auth]\ntokens_file = "{tokens}"\n'
                        '[l3]\nsecret_access_key = "s3cr3t-xyz"\n')
    assert cli.main(["config", "--effective", "--config", str(original)]) == 0
    text = capsys.readouterr().out
    assert f'tokens_file = "{tokens}"' in text
    assert "s3cr3t-xyz" not in text and "# secret_access_key: set, redacted" in text
    effective = tmp_path / "effective.toml"
    effective.write_text(text)
    assert load(file=effective, env={}).auth.tokens_file == str(tokens)
