from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvstore import config as cfg
from kvstore.errors import InvalidConfig

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("text,expected", [
    ("4096", 4096), ("64MiB", 64 << 20), ("2GiB", 2 << 30), ("1.5G", int(1.5 * (1 << 30))),
    ("512k", 512 << 10), (12, 12), ("7B", 7),
    # (decimal-looking units are binary, as the README says)
    ("500GB", 500 << 30), ("12 MB", 12 << 20), ("12mb", 12 << 20),
])
def test_sizes_parse(text: object, expected: int) -> None:
    assert cfg.parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-1", "1PB", True])
def test_bad_sizes_are_clear_errors(bad: object) -> None:
    with pytest.raises(InvalidConfig):
        cfg.parse_size(bad)


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    toml = tmp_path / "k.toml"
    toml.write_text('data_dir = "/from/file"\n[l1]\ncapacity = "1GiB"\nprefault = false\n'
                    '[server]\nlisten = "127.0.0.1:1"\n')
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser)
    args = parser.parse_args(["--config", str(toml), "--server-listen", "127.0.0.1:3"])
    c = cfg.load(args, env={"KVSTORE_L1_CAPACITY": "2GiB", "KVSTORE_SERVER_LISTEN": "x:2"})
    assert c.data_dir == "/from/file"
    assert c.l1.capacity == 2 << 30  # env beats file
    assert c.l1.prefault is False
    assert c.server.listen == "127.0.0.1:3"  # flag beats env
    assert c.l2.capacity == cfg.L2Config().capacity  # default
    with pytest.raises(AttributeError):
        c.l1.capacity = 5  # type: ignore[misc]  # frozen


def test_unknown_option_in_file_is_rejected(tmp_path: Path) -> None:
    toml = tmp_path / "k.toml"
    toml.write_text("[l1]\ncapacty = 5\n")
    with pytest.raises(InvalidConfig, match="capacty"):
        cfg.load(file=toml, env={})


def test_a_misspelt_options_variable_is_refused_naming_it() -> None:
    # It was read by no one: the server ran on the default, without a word.
    with pytest.raises(InvalidConfig, match="KVSTORE_L1_CAPCITY names no option "
                                            r"\(did you mean KVSTORE_L1_CAPACITY\?\)"):
        cfg.load(env={"KVSTORE_L1_CAPCITY": "1GiB"})
    # Other KVSTORE_* variables (the client's, the tools') are not options.
    cfg.load(env={"KVSTORE_TARGET": "x", "KVSTORE_TOKEN": "t", "KVSTORE_LOG_LEVEL": "INFO"})


def test_what_serve_refuses_config_refuses_too() -> None:
    """`kvstore config --effective` is the check before a deploy: it passed
    values the object tier then refused at start, and quotas for names no
    request can use."""
    for env, message in (({"KVSTORE_L3_CONCURRENCY": "0"}, "l3.concurrency must be at least 1"),
                         ({"KVSTORE_L3_RETRIES": "-1"}, "l3.retries must be at least 0"),
                         ({"KVSTORE_L3_BREAKER_FAILURES": "0"}, "l3.breaker_failures"),
                         ({"KVSTORE_L3_READ_CONCURRENCY": "0"}, "l3.read_concurrency"),
                         ({"KVSTORE_QUOTA_L1": "chat/v1=1GiB"}, "quota.l1: namespace 'chat/v1'"),
                         ({"KVSTORE_QUOTA_L2": '{"bad name" = "1GiB"}'}, "quota.l2")):
        with pytest.raises(InvalidConfig, match=re.escape(message)):
            cfg.load(env=env)


def test_invalid_values_are_rejected_with_the_option_name() -> None:
    with pytest.raises(InvalidConfig, match=r"l1\.capacity \(from \$KVSTORE_L1_CAPACITY\)"):
        cfg.load(env={"KVSTORE_L1_CAPACITY": "huge"})
    with pytest.raises(InvalidConfig, match="address"):
        cfg.load(env={"KVSTORE_SERVER_LISTEN": ""})
    with pytest.raises(InvalidConfig, match=r"l1\.verify_reads must be 'shared' or 'always'"):
        cfg.load(env={"KVSTORE_L1_VERIFY_READS": "never"})
    # (an operator's "no disk tier"; taken, no block could ever leave L1)
    with pytest.raises(InvalidConfig, match=r"l2\.capacity must be positive \(for no L2: "
                                            r"l2\.enabled = false\)"):
        cfg.load(env={"KVSTORE_L2_CAPACITY": "0"})
    assert cfg.load(env={"KVSTORE_L2_CAPACITY": "0", "KVSTORE_L2_ENABLED": "false"})


def test_readme_config_reference_is_current() -> None:
    text = README.read_text()
    m = re.search(r"<!-- config-reference:start[^>]*-->\n(.*?)<!-- config-reference:end -->",
                  text, re.S)
    assert m, "README lacks the config reference markers"
    assert m.group(1).strip() == cfg.reference_markdown().strip(), (
        "README config reference is stale: regenerate it with "
        "python -m kvstore.config README.md")


def test_the_policy_names_the_configuration_accepts_are_the_policies() -> None:
    from kvstore.config import POLICY_NAMES
    from kvstore.policy import POLICIES

    assert set(POLICIES) == POLICY_NAMES


# The per-namespace quotas as the README and `serve --help` give them: a TOML
# table or NAME=SIZE pairs, in the file, an env variable or a flag alike (a
# table in a flag or variable was "size ' \"1GiB\"}' is not understood").
QUOTA_FORMS = {"table": '{chat = "1GiB", code = "512MiB"}', "text": "chat=1GiB,code=512MiB"}


def _effective(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvstore", "config", "--effective", *flags],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("form", sorted(QUOTA_FORMS))
@pytest.mark.parametrize(("option", "source"), [("l1", "flag"), ("l1", "env"), ("l2", "env"),
                                                ("l2", "flag")])
def test_quotas_take_a_table_or_pairs_from_a_flag_or_the_environment(
        tmp_path: Path, option: str, source: str, form: str) -> None:
    value = QUOTA_FORMS[form]
    out = _effective(f"--quota-{option}", value) if source == "flag" else \
        _effective(env={f"KVSTORE_QUOTA_{option.upper()}": value})
    assert out.returncode == 0, out.stderr
    # What serve would run with, and TOML that --config reads back the same.
    effective = tmp_path / "effective.toml"
    effective.write_text(out.stdout)
    quotas = cfg.load(file=effective, env={}).quota
    limit = quotas.l1_limit if option == "l1" else quotas.l2_limit
    assert (limit("chat"), limit("code"), limit("other")) == (1 << 30, 512 << 20, 0)


def test_a_quota_table_that_is_not_toml_names_the_option_and_the_form() -> None:
    out = _effective("--quota-l1", "{chat = 1GiB}")  # the size unquoted
    assert out.returncode == 2
    assert out.stderr == ("kvstore: quota.l1 (from --quota-l1): '{chat = 1GiB}' is not a TOML "
                          "inline table like {chat = \"1GiB\"} (Unclosed inline table)\n")


# -- values an outside review found accepted, then crashing or misread (session 29) ---------


@pytest.mark.parametrize("toml,option", [
    # 2^32 ms reaches clients in a uint32: every data-plane call failed INTERNAL
    ("[server]\ndata_plane_timeout_ms = 4294967296\n", "server.data_plane_timeout_ms"),
    ("[server]\ndata_plane_ticket_ms = 4294967296\n", "server.data_plane_ticket_ms"),
    ("[server]\nshm_lease_ms = 4294967296\n", "server.shm_lease_ms"),
    # sizes past the C types they end in: a traceback at serve
    ('[l1]\ncapacity = "99999999999999999999TiB"\n', "l1.capacity"),
    ('[l2]\ninitial_map_size = "99999999999TiB"\n', "l2.initial_map_size"),
    ('[server]\nmax_message_bytes = "2GiB"\n', "server.max_message_bytes"),
    # other types turned into text, or numbers cut short
    ('data_dir = ["/var/lib/kvstore"]\n', "data_dir"),
    ("[server]\nunix_socket = true\n", "server.unix_socket"),
    ("[server]\nmax_block_bytes = 1.9\n", "server.max_block_bytes"),
    ('[l2]\ncapacity = "0.5"\n', "l2.capacity"),
    ("[server]\ngrace_seconds = true\n", "server.grace_seconds"),
    ('[server]\nnamespaces = ["a", 7]\n', "server.namespaces"),
])
def test_values_that_once_crashed_or_were_misread_are_refused_naming_the_option(
        tmp_path: Path, toml: str, option: str) -> None:
    path = tmp_path / "k.toml"
    path.write_text(toml)
    with pytest.raises(InvalidConfig, match=re.escape(option)):
        cfg.load(file=path, env={})


@pytest.mark.parametrize("name", ["KVSTORE_L2_ENABLED", "KVSTORE_SERVER_DATA_PLANE",
                                  "KVSTORE_DATA_DIR"])
def test_an_empty_variable_is_not_a_silent_false_or_the_current_directory(name: str) -> None:
    with pytest.raises(InvalidConfig, match=r"empty|not a boolean"):
        cfg.load(env={name: ""})


def test_a_config_file_that_cannot_be_read_is_one_clear_error(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"# timeouts in \xb5s\n[l1]\ncapacity = \"1GiB\"\n")
    with pytest.raises(InvalidConfig, match="is not UTF-8"):
        cfg.load(file=latin1, env={})
    with pytest.raises(InvalidConfig, match="cannot read it"):
        cfg.load(file=tmp_path, env={})  # a directory


def test_paths_handed_to_clients_are_absolute_and_home_is_expanded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative l1.shm_path or unix socket went to clients as it was: a
    ShmClient in another directory was told it was on another host."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/home/someone")
    c = cfg.load(env={"KVSTORE_L1_SHM_PATH": "arena.shm", "KVSTORE_SERVER_UNIX_SOCKET": "kv.sock",
                      "KVSTORE_DATA_DIR": "~/kvstore-data"})
    assert c.l1.shm_path == str(tmp_path / "arena.shm")
    assert c.server.unix_socket == str(tmp_path / "kv.sock")
    assert c.data_dir == "/home/someone/kvstore-data"
    assert cfg.load(env={}).data_dir == "./kvstore-data"  # the default stays as documented


def test_changed_options_names_what_differs() -> None:
    before = cfg.load(env={})
    after = cfg.load(env={"KVSTORE_SERVER_NAMESPACES": "a,b", "KVSTORE_L1_CAPACITY": "1GiB"})
    assert cfg.changed_options(before, after) == ["server.namespaces", "l1.capacity"]
    assert cfg.changed_options(before, cfg.load(env={})) == []


def test_tenants_sharing_an_arena_are_warned_at_start(tmp_path: Path) -> None:
    """A review read and overwrote another tenant's blocks from a namespace
    server.shm_namespaces allowed: the arena holds every namespace's L1
    blocks, and the list says only who may attach. The start says so."""
    from kvstore.server.app import shared_arena_warning

    tokens = tmp_path / "tokens"
    tokens.write_text("")
    arena = {"KVSTORE_L1_SHM_PATH": "/dev/shm/kvstore-test-warn"}
    auth = {"KVSTORE_AUTH_TOKENS_FILE": str(tokens)}
    assert shared_arena_warning(cfg.load(env=arena)) is None  # one trust domain
    assert shared_arena_warning(cfg.load(env=auth)) is None  # no arena to share
    warning = shared_arena_warning(cfg.load(env={**arena, **auth}))
    assert warning is not None and "every identity" in warning and "every namespace" in warning
    listed = shared_arena_warning(cfg.load(env={**arena, **auth,
                                                "KVSTORE_SERVER_SHM_NAMESPACES": "a,b"}))
    assert listed is not None and "granted a, b" in listed and "server each" in listed
