"""`kvstore config --example` (the committed deploy/kvstore.example.toml) and
`kvstore config --effective` (the merged configuration, credentials left out)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvstore import cli, config_toml
from kvstore.config import Config, _options, load

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "kvstore.example.toml"


def test_committed_example_is_current() -> None:
    assert EXAMPLE.read_text() == config_toml.example(), (
        "deploy/kvstore.example.toml is out of date with kvstore/config.py: regenerate it "
        "with `kvstore config --example -o deploy/kvstore.example.toml`")


def test_example_names_every_option_with_env_and_flag() -> None:
    text = EXAMPLE.read_text()
    for section, f in _options():
        header = f"[{section}]" if section else None
        assert header is None or f"\n{header}\n" in text
        assert re.search(rf"^#{f.name} = ", text, re.M), f"{section}.{f.name}"
    assert "KVSTORE_L3_SECRET_ACCESS_KEY" in text and "--l1-capacity" in text


def test_example_loads_as_the_defaults_commented_and_uncommented(tmp_path: Path) -> None:
    assert load(file=EXAMPLE, env={}) == Config()
    uncommented = tmp_path / "all.toml"
    uncommented.write_text(re.sub(r"^#(\w+ = )", r"\1", EXAMPLE.read_text(), flags=re.M))
    assert uncommented.read_text().count("\n#") < EXAMPLE.read_text().count("\n#")
    assert load(file=uncommented, env={}) == Config()  # every default reads back as itself


def test_example_command_writes_the_file(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "example.toml"
    assert cli.main(["config", "--example", "-o", str(out)]) == 0
    assert out.read_text() == EXAMPLE.read_text()
    assert cli.main(["config", "--example"]) == 0
    assert capsys.readouterr().out == EXAMPLE.read_text()


def run_effective(*flags: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    return subprocess.run([sys.executable, "-m", "kvstore", "config", "--effective", *flags],
                          capture_output=True, text=True, timeout=60, env={**base, **env})


def test_effective_merges_file_env_and_flags_and_hides_credentials(tmp_path: Path) -> None:
    file = tmp_path / "kvstore.toml"
    file.write_text('data_dir = "/srv/kv"\n[l1]\ncapacity = "2GiB"\n[l2]\nsync = true\n'
                    '[server]\nnamespaces = ["a", "b"]\n')
    secret, key_id = "s3cr3t-Value-xyz", "AKIA-visible-nowhere"
    out = run_effective(
        "--l1-capacity", "3GiB", "--server-metrics-listen", "127.0.0.1:9400",
        env={"KVSTORE_CONFIG": str(file), "KVSTORE_L2_CAPACITY": "100GiB",
             "KVSTORE_L3_URL": "s3://bucket/p",
             "KVSTORE_L3_ENDPOINT": "https://user:pw-in-url@s3.example.internal",
             "KVSTORE_L3_ACCESS_KEY_ID": key_id, "KVSTORE_L3_SECRET_ACCESS_KEY": secret})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for hidden in (secret, key_id, "pw-in-url"):
        assert hidden not in text
    assert "# secret_access_key: set, redacted" in text
    assert 'capacity = "3GiB"' in text  # flag beats file
    assert 'capacity = "100GiB"' in text  # env
    assert 'data_dir = "/srv/kv"' in text and "sync = true" in text  # file
    assert 'namespaces = ["a", "b"]' in text
    assert 'metrics_listen = "127.0.0.1:9400"' in text

    # The output is a config file: it loads back to the same configuration,
    # less the credentials.
    echo = tmp_path / "effective.toml"
    echo.write_text(text)
    back = load(file=echo, env={})
    expected = load(file=file, env={
        "KVSTORE_L1_CAPACITY": "3GiB", "KVSTORE_SERVER_METRICS_LISTEN": "127.0.0.1:9400",
        "KVSTORE_L2_CAPACITY": "100GiB", "KVSTORE_L3_URL": "s3://bucket/p",
        "KVSTORE_L3_ENDPOINT": "https://<redacted>@s3.example.internal"})
    assert back == expected


def test_effective_reports_a_bad_option_as_a_usage_error() -> None:
    out = run_effective("--l1-capacity", "lots", env={})
    assert out.returncode == 2
    assert out.stderr.startswith("kvstore: ") and "lots" in out.stderr


def test_effective_of_the_defaults_is_the_defaults(tmp_path: Path) -> None:
    out = run_effective(env={})
    assert out.returncode == 0, out.stderr
    path = tmp_path / "defaults.toml"
    path.write_text(out.stdout)
    assert load(file=path, env={}) == Config()


@pytest.mark.parametrize(("flags", "named"), [
    (("--policy-name", "foo"), "policy.name 'foo'"),
    (("--server-listen", "nohostport"), "server.listen 'nohostport'"),
    (("--server-metrics-listen", "127.0.0.1"), "server.metrics_listen"),
    (("--l3-url", "ftp://x/y"), "l3.url 'ftp://x/y'"),
    (("--l3-url", "s3://b/p", "--l3-endpoint", "http://10.1.2.3:9000"), "l3.endpoint"),
    (("--l3-url", "s3://user:pw@b/p"), "l3.url must not carry credentials"),
    (("--l3-timeout-s", "-1"), "l3.timeout_s"),
    (("--l3-timeout-s", "nan"), "not a finite number"),
    (("--server-grace-seconds", "inf"), "not a finite number"),
    (("--policy-session-horizon", "nan"), "not a finite number"),
    (("--server-metrics-listen", "off"), "server.metrics_listen 'off'"),
    (("--server-listen", ":0"), "server.listen ':0'"),
    (("--server-listen", "127.0.0.1:\u0660"), "is not host:port"),
    (("--server-listen", "127.0.0.1:\u00b2"), "is not host:port"),
    # An AWS secret key holds "/": urlsplit then ends the host before the "@".
    (("--l3-url", "s3://AKIAX:wJal/K7MD/bPxR@kvstore-cache/blocks"),
     "l3.url must not carry credentials"),
])
def test_effective_refuses_what_serve_refuses(flags: tuple[str, ...], named: str,
                                              tmp_path: Path) -> None:
    """`config --effective` loads "exactly as serve would": a value serve
    refuses at start is refused here too, in one line naming the option, exit 2
    (each passed here, rc 0, and serve refused it; nan and inf passed both, nan
    making every L3 request time out)."""
    out = run_effective(*flags, env={})
    assert out.returncode == 2, out.stdout
    assert out.stderr.startswith("kvstore: ") and named in out.stderr, out.stderr
    assert "wJal" not in out.stderr and "K7MD" not in out.stderr
    assert out.stderr.count("\n") == 1
    serve = subprocess.run([sys.executable, "-m", "kvstore", "serve", "--data-dir",
                            str(tmp_path / "data"), *flags], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "KVSTORE_CONFIG": ""}, check=False)
    assert serve.returncode == 2 and named in serve.stderr, serve.stderr
    assert not (tmp_path / "data").exists()  # refused before it touched anything


def test_a_refused_endpoint_is_named_without_its_password(tmp_path: Path) -> None:
    """serve's one-line refusal of an l3.endpoint quotes it: its password is
    redacted there too (it went to stderr as written, past the log's redaction)."""
    flags = ("--l3-url", "s3://b/p", "--l3-endpoint", "http://minio:SECRETPW@10.0.0.1:9000")
    for cmd in (["config", "--effective"], ["serve", "--data-dir", str(tmp_path / "d")]):
        out = subprocess.run([sys.executable, "-m", "kvstore", *cmd, *flags],
                             capture_output=True, text=True, timeout=60, check=False,
                             env={**os.environ, "KVSTORE_CONFIG": ""})
        assert out.returncode == 2 and "l3.endpoint" in out.stderr, out.stderr
        assert "SECRETPW" not in out.stderr and "<redacted>@10.0.0.1" in out.stderr
