"""The policy section of the server config: the default policy, and the session policy's
options from a TOML table, the environment and flags, reaching the policy object."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kvstore import config as kvconfig
from kvstore.errors import InvalidConfig
from kvstore.policy import LRUPolicy, SessionPolicy, make_policy
from kvstore.types import TierName

L1, L2 = TierName.L1, TierName.L2


def _load(argv: list[str], env: dict[str, str] | None = None) -> kvconfig.Config:
    parser = argparse.ArgumentParser()
    kvconfig.add_arguments(parser)
    return kvconfig.load(parser.parse_args(argv), env=env or {})


def test_the_default_policy_is_session_and_lru_one_flag_away() -> None:
    p = make_policy(_load([]).policy, [L1, L2])
    assert isinstance(p, SessionPolicy) and p.config == kvconfig.SessionPolicyConfig()
    assert isinstance(make_policy(_load(["--policy-name", "lru"]).policy, [L1, L2]), LRUPolicy)
    assert isinstance(make_policy("lru", [L1]), LRUPolicy)  # a bare name: default options


def test_session_options_from_file_env_and_flags_reach_the_policy(tmp_path: Path) -> None:
    toml = tmp_path / "k.toml"
    toml.write_text('[policy]\nname = "session"\n\n[policy.session]\nduel = false\n'
                    'tool_min = 3\nhorizon = 60.0\n')
    c = _load(["--config", str(toml), "--policy-session-horizon", "0"],
              env={"KVSTORE_POLICY_SESSION_TOOL_MIN": "5",
                   "KVSTORE_POLICY_SESSION_DUEL_RETRY": "7"})
    sp = c.policy.session
    assert (sp.duel, sp.tool_min, sp.horizon, sp.duel_retry) == (False, 5, 0.0, 7)
    p = make_policy(c.policy, [L1])
    assert isinstance(p, SessionPolicy)
    assert (p.duel, p.tool_min, p.horizon, p.duel_retry) == (False, 5, 0.0, 7)


def test_a_config_file_with_retired_session_options_still_loads(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Options removed from [policy.session] (quantile, per_stream, defer_shared) are
    accepted in a config file, ignored, and named in one warning each."""
    toml = tmp_path / "old.toml"
    toml.write_text("[policy.session]\nquantile = 0.5\nper_stream = true\n"
                    "defer_shared = true\ntool_min = 4\n")
    with caplog.at_level("WARNING", logger="kvstore.config"):
        c = _load(["--config", str(toml)])
    assert c.policy.session == kvconfig.SessionPolicyConfig(tool_min=4)
    text = caplog.text
    for name in ("quantile", "per_stream", "defer_shared"):
        assert f"policy.session.{name}" in text and "retired" in text


def test_bad_session_options_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfig, match=r"policy\.session\.duel_decay"):
        _load(["--policy-session-duel-decay", "1.5"])
    with pytest.raises(InvalidConfig,
                       match=r"policy\.session\.duel \(from \$KVSTORE_POLICY_SESSION_DUEL\)"):
        _load([], env={"KVSTORE_POLICY_SESSION_DUEL": "maybe"})
    with pytest.raises(InvalidConfig, match=r"policy\.session\.max_streams must be >= 1"):
        _load(["--policy-session-max-streams", "0"])
    with pytest.raises(InvalidConfig,
                       match=r"policy\.session\.max_tracked_blocks must be >= 1"):
        _load(["--policy-session-max-tracked-blocks", "0"])
    with pytest.raises(InvalidConfig, match=r"policy\.session\.placing_scale must be in"):
        _load(["--policy-session-placing-scale", "0"])
    toml = tmp_path / "k.toml"
    toml.write_text("[policy.session]\nno_such_knob = 1\n")
    with pytest.raises(InvalidConfig, match="no_such_knob"):
        _load(["--config", str(toml)])


def test_every_session_option_is_documented_in_help_and_readme() -> None:
    import dataclasses

    parser = argparse.ArgumentParser()
    kvconfig.add_arguments(parser)
    text = parser.format_help()
    table = kvconfig.reference_markdown()
    for f in dataclasses.fields(kvconfig.SessionPolicyConfig):
        flag = "--policy-session-" + f.name.replace("_", "-")
        assert flag in text and f"`policy.session.{f.name}`" in table
        assert f"KVSTORE_POLICY_SESSION_{f.name.upper()}" in table


def test_the_server_path_never_imports_the_simulator_accelerator() -> None:
    import subprocess
    import sys

    code = ("import sys, kvstore.policy, kvstore.store, kvstore.server.app, kvstore.cli\n"
            "print('kvstore.policy.fast' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
