"""deploy/: what can be checked without a container engine or a cluster.

The manifests and the compose file parse; every option and KVSTORE_* variable
they set exists in kvstore.config; the ConfigMap's TOML loads through
kvstore.config.load and the server starts on it; probes, ports, volumes,
Secret mapping and memory limits agree with that config; the image's
entrypoint command works when run directly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.config import Config, _env, _options, load, parse_size
from kvstore.tiers.object import ObjectTier

yaml = pytest.importorskip("yaml", reason="PyYAML is a test dependency (pip install pyyaml)")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
GiB = 1024**3

# What the server needs beyond L1 itself: both write-behind queues plus this
# (docs/deploy.md, "Memory": ~1.5 GiB).
HEADROOM = 3 * GiB // 2
#: The slowest disk a stop is sized for (docs/deploy.md, "Shutdown").
FLUSH_BYTES_PER_S = 500 * 10**6


def k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def k8s(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in k8s_docs()
             if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


_DEFAULT_RE = re.compile(r"\$\{([A-Z0-9_]+):-([^}]*)\}")


def compose_env(service: str) -> dict[str, str]:
    """A service's environment with ${VAR:-default} resolved to the default."""
    env = compose()["services"][service]["environment"]
    return {k: _DEFAULT_RE.sub(lambda m: m.group(2), str(v)) for k, v in env.items()}


def configmap_toml(tmp_path: Path) -> Path:
    cm = k8s("ConfigMap", "kvstore-config")
    path = tmp_path / "kvstore.toml"
    path.write_text(cm["data"]["kvstore.toml"])
    return path


def image_env() -> dict[str, str]:
    """The KVSTORE_* variables the image's final stage sets (they override
    the ConfigMap's file, so the ConfigMap leaves those keys to the image)."""
    env: dict[str, str] = {}
    for line in dockerfile_stages()[-1]:
        if line.upper().startswith("ENV "):
            for name, value in re.findall(r"(KVSTORE_[A-Z0-9_]+)=(\S+)", line):
                env[name] = value
    return env


def config_env_names() -> set[str]:
    return {_env(section, f.name) for section, f in _options()}


def source_env_names() -> set[str]:
    """KVSTORE_* names the code itself reads (KVSTORE_CONFIG, KVSTORE_LOG_LEVEL...)."""
    names: set[str] = set()
    for path in [*(ROOT / "kvstore").rglob("*.py"), ROOT / "setup.py"]:
        names.update(re.findall(r"[\"'](KVSTORE_[A-Z0-9_]*[A-Z0-9])[\"']", path.read_text()))
    return names


def memory_bytes(quantity: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(quantity))
    assert m, quantity
    unit = {None: 1, "Ki": 1024, "Mi": 1024**2, "Gi": GiB, "Ti": 1024**4,
            "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[m.group(2)]
    return int(float(m.group(1)) * unit)


def needed_memory(cfg: Config) -> int:
    return cfg.l1.capacity + cfg.l2.write_queue_bytes + cfg.l3.write_queue_bytes + HEADROOM


# -- parsing -----------------------------------------------------------------------------


def test_every_yaml_file_parses_and_k8s_objects_are_well_formed() -> None:
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 6
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert docs, f"{path} is empty"
    kinds = {d["kind"] for d in k8s_docs()}
    assert {"Namespace", "ConfigMap", "Secret", "DaemonSet", "Service"} <= kinds
    for doc in k8s_docs():
        assert doc["apiVersion"] and doc["metadata"]["name"], doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "kvstore", doc["metadata"]


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    ds = k8s("DaemonSet")
    image = ds["spec"]["template"]["spec"]["containers"][0]["image"].rsplit(":", 1)[0]
    assert image in {i["name"] for i in kust["images"]}


# -- config keys and env vars ------------------------------------------------------------


def test_configmap_toml_loads_through_kvstore_config(tmp_path: Path) -> None:
    cfg = load(file=configmap_toml(tmp_path), env=image_env())  # unknown keys would raise
    assert cfg.server.listen == "0.0.0.0:50051"
    assert cfg.data_dir == "/data"
    assert cfg.l3.url.startswith("s3://")
    assert not cfg.l3.access_key_id and not cfg.l3.secret_access_key  # from the Secret
    ObjectTier.from_config(cfg.l3)  # the L3 settings are accepted (https endpoint)


def test_the_configmap_sets_no_key_the_image_env_overrides(tmp_path: Path) -> None:
    """An edit of such a key in the ConfigMap would do nothing (env wins)."""
    env = image_env()
    assert {"KVSTORE_DATA_DIR", "KVSTORE_SERVER_LISTEN"} <= env.keys()
    from_file = load(file=configmap_toml(tmp_path), env={})
    defaults = load(env={})
    overridden = {
        name for name, getter in (
            ("KVSTORE_DATA_DIR", lambda c: c.data_dir),
            ("KVSTORE_SERVER_LISTEN", lambda c: c.server.listen),
            ("KVSTORE_SERVER_METRICS_LISTEN", lambda c: c.server.metrics_listen))
        if name in env and getter(from_file) != getter(defaults)}
    assert not overridden, f"the ConfigMap sets keys the image's env overrides: {overridden}"


def test_every_kvstore_env_var_named_anywhere_exists() -> None:
    known = config_env_names() | source_env_names()
    texts = {p: p.read_text() for p in [*DEPLOY.rglob("*"), ROOT / "docs" / "deploy.md"]
             if p.is_file()}
    named: dict[str, set[str]] = {}
    for path, text in texts.items():
        for name in re.findall(r"\bKVSTORE_[A-Z0-9_]*[A-Z0-9]\b", text):
            named.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    unknown = {n: sorted(w) for n, w in named.items() if n not in known}
    assert not unknown, f"KVSTORE_* variables that kvstore does not read: {unknown}"
    assert {"KVSTORE_L3_ACCESS_KEY_ID", "KVSTORE_L3_SECRET_ACCESS_KEY"} <= named.keys()


def test_compose_environment_is_a_valid_config() -> None:
    env = compose_env("kvstore")
    cfg = load(env=env)
    assert cfg.l3.url and cfg.l3.access_key_id and cfg.l3.secret_access_key
    # Plain http is only accepted on loopback: kvstore shares MinIO's network
    # namespace so the endpoint is 127.0.0.1.
    ObjectTier.from_config(cfg.l3)
    assert compose()["services"]["kvstore"]["network_mode"] == "service:minio"
    mem_limit = parse_size(compose()["services"]["kvstore"]["mem_limit"].upper())
    assert mem_limit >= needed_memory(cfg)


def test_compose_creates_the_bucket_before_kvstore_starts() -> None:
    services = compose()["services"]
    init = services["createbucket"]
    assert "minio/mc" in init["image"]
    bucket = compose_env("kvstore")["KVSTORE_L3_URL"].removeprefix("s3://").split("/")[0]
    script = "\n".join(init["command"])
    assert f"local/{bucket}" in script
    assert services["kvstore"]["depends_on"]["createbucket"]["condition"] == (
        "service_completed_successfully")
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    minio_user = services["minio"]["environment"]["MINIO_ROOT_USER"]
    assert services["kvstore"]["environment"]["KVSTORE_L3_ACCESS_KEY_ID"] == minio_user
    assert any("50051" in p for p in services["minio"]["ports"])


# -- the DaemonSet against the config ----------------------------------------------------


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[tuple[dict[str, Any], dict[str, Any], Config]]:
    spec = k8s("DaemonSet", "kvstore")["spec"]["template"]["spec"]
    container = next(c for c in spec["containers"] if c["name"] == "kvstore")
    yield spec, container, load(file=configmap_toml(tmp_path), env=image_env())


def test_daemonset_runs_on_gpu_nodes_with_nvme_for_l2(pod: Any) -> None:
    spec, container, cfg = pod
    assert spec["nodeSelector"], "one daemon per GPU node: nodeSelector is required"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    data = volumes[mounts[cfg.data_dir]]
    assert "hostPath" in data and "nvme" in data["hostPath"]["path"]
    socket_dir = str(Path(cfg.server.unix_socket).parent)
    assert "hostPath" in volumes[mounts[socket_dir]]


def test_daemonset_reads_the_configmap_and_the_secret(pod: Any) -> None:
    spec, container, _ = pod
    env = {e["name"]: e for e in container["env"]}
    config_path = Path(env["KVSTORE_CONFIG"]["value"])
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    cm_volume = volumes[mounts[str(config_path.parent)]]
    assert cm_volume["configMap"]["name"] == "kvstore-config"
    assert config_path.name in k8s("ConfigMap", "kvstore-config")["data"]

    secret = k8s("Secret")
    for name in ("KVSTORE_L3_ACCESS_KEY_ID", "KVSTORE_L3_SECRET_ACCESS_KEY"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    # Credentials only from the Secret: never in the ConfigMap.
    assert "access_key" not in k8s("ConfigMap")["data"]["kvstore.toml"]


def test_daemonset_probes_use_grpc_health_on_the_served_port(pod: Any) -> None:
    _, container, cfg = pod
    port = int(cfg.server.listen.rsplit(":", 1)[1])
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["grpc"] == port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port, probe
    # A loaded server under a CPU quota answered in up to 1.2 s
    # (docs/deploy.md, "Under a CPU quota"): no probe may give up sooner than
    # 3 s (Kubernetes' default timeoutSeconds is 1).
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe].get("timeoutSeconds", 1) >= 3, probe
    # Liveness must be more patient than readiness.
    live, ready = container["livenessProbe"], container["readinessProbe"]
    assert (live["periodSeconds"] * live["failureThreshold"]
            > ready["periodSeconds"] * ready["failureThreshold"])


def test_daemonset_memory_limit_matches_the_tiers(pod: Any) -> None:
    _, container, cfg = pod
    res = container["resources"]
    limit = memory_bytes(res["limits"]["memory"])
    assert limit >= needed_memory(cfg), (limit / GiB, needed_memory(cfg) / GiB)
    assert limit <= needed_memory(cfg) + 2 * GiB, "limit far above what the tiers need"
    assert res["requests"]["memory"] == res["limits"]["memory"]  # Guaranteed QoS


def test_daemonset_runs_as_non_root(pod: Any) -> None:
    spec, container, _ = pod
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert container.get("securityContext", {}).get("runAsUser", 1) != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    grace = spec["terminationGracePeriodSeconds"]
    cfg = pod[2]
    # A stop writes L1's blocks not yet in L2 after the calls' grace: a
    # SIGKILL before that loses acknowledged memory-level Puts.
    dirty = (1 - cfg.l2.clean_reserve) * cfg.l1.capacity
    assert grace > cfg.server.grace_seconds + dirty / FLUSH_BYTES_PER_S


def test_service_routes_to_the_local_daemon() -> None:
    svc = k8s("Service", "kvstore")["spec"]
    assert svc["internalTrafficPolicy"] == "Local"
    ds = k8s("DaemonSet", "kvstore")
    assert svc["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()


# -- the image ---------------------------------------------------------------------------


def dockerfile_stages() -> list[list[str]]:
    lines: list[str] = []
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        if raw.strip().startswith("#"):
            continue
        if lines and lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1] + " " + raw.strip()
        else:
            lines.append(raw.strip())
    stages: list[list[str]] = []
    for line in filter(None, lines):
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_is_multi_stage_non_root_with_kvstore_serve_entrypoint() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    assert any("pip wheel" in line for line in stages[0])
    final = stages[-1]
    user = [line.split(None, 1)[1] for line in final if line.upper().startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    entry = [line.split(None, 1)[1] for line in final if line.upper().startswith("ENTRYPOINT ")]
    assert entry and json.loads(entry[-1]) == ["kvstore", "serve"]
    envs = " ".join(line for line in final if line.upper().startswith("ENV "))
    for name in re.findall(r"\b(KVSTORE_[A-Z0-9_]+)=", envs):
        assert name in config_env_names()
    exposed = [line.split()[1:] for line in final if line.upper().startswith("EXPOSE ")]
    assert exposed == [["50051", "9400"]]
    assert "KVSTORE_SERVER_METRICS_LISTEN=0.0.0.0:9400" in envs
    assert any('"kvstore[l3,metrics]"' in line for line in final)


def test_dockerfile_healthcheck_runs_kvstore_health() -> None:
    final = dockerfile_stages()[-1]
    checks = [line for line in final if line.upper().startswith("HEALTHCHECK ")]
    assert len(checks) == 1
    cmd = json.loads(checks[0].split(" CMD ", 1)[1])
    script = cmd[-1]
    assert "kvstore health --target 127.0.0.1:50051" in script
    # Docker reserves exit status 2 (kvstore health: unreachable): map to 1.
    assert script.endswith("|| exit 1")
    assert "--start-period=" in checks[0]


def kvstore_command() -> str:
    exe = Path(sys.executable).parent / "kvstore"
    if exe.exists():
        return str(exe)
    found = shutil.which("kvstore")
    if found is None:
        pytest.skip("the kvstore console script is not installed (pip install -e .)")
    return found


def test_entrypoint_help_works() -> None:
    out = subprocess.run([kvstore_command(), "serve", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--l3-url" in out.stdout and "--config" in out.stdout


def test_entrypoint_serves_the_configmap_config(tmp_path: Path) -> None:
    """`kvstore serve` on the ConfigMap's file, with only the machine-specific
    values (paths, sizes, address) overridden by env like a pod would."""
    grpc = pytest.importorskip("grpc")
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ready = tmp_path / "ready.json"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")},
        "KVSTORE_CONFIG": str(configmap_toml(tmp_path)),
        "KVSTORE_DATA_DIR": str(tmp_path / "data"),
        "KVSTORE_SERVER_LISTEN": "127.0.0.1:0",
        "KVSTORE_SERVER_UNIX_SOCKET": str(tmp_path / "run" / "kvstore.sock"),
        "KVSTORE_L1_CAPACITY": "32MiB",
        "KVSTORE_L1_PREFAULT": "false",
        "KVSTORE_L2_CAPACITY": "64MiB",
        "KVSTORE_L2_INITIAL_MAP_SIZE": "16MiB",
        "KVSTORE_L3_URL": f"file://{tmp_path}/l3",
        "KVSTORE_L3_ENDPOINT": "",
        "KVSTORE_SERVER_METRICS_LISTEN": "127.0.0.1:0",
        "KVSTORE_L1_SHM_PATH": f"/dev/shm/kvstore-test-{os.getpid()}-{time.time_ns()}",
        "KVSTORE_LOG_LEVEL": "WARNING",
    }
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([kvstore_command(), "serve", "--ready-file", str(ready)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():  # bounded poll on the ready file
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        info = json.loads(ready.read_text())
        tcp = info["tcp"]
        assert info["metrics"].startswith("127.0.0.1:")  # the ConfigMap turns metrics on
        assert Path(env["KVSTORE_L1_SHM_PATH"]).exists()  # and the shared-memory arena
        with grpc.insecure_channel(tcp) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
        assert not Path(env["KVSTORE_L1_SHM_PATH"]).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        Path(env["KVSTORE_L1_SHM_PATH"]).unlink(missing_ok=True)


# -- shared memory, metrics, monitoring, systemd, example config -------------------------


def test_daemonset_shares_the_socket_and_shm_dirs_with_engine_pods(pod: Any) -> None:
    spec, container, cfg = pod
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    shm_dir = str(Path(cfg.l1.shm_path).parent)
    assert shm_dir == "/dev/shm/kvstore"
    # Same path on the node and in the pod: the server hands clients its arena path.
    assert volumes[mounts[shm_dir]]["hostPath"]["path"] == shm_dir
    socket_dir = str(Path(cfg.server.unix_socket).parent)
    assert volumes[mounts[socket_dir]]["hostPath"]["path"] == socket_dir
    init = spec["initContainers"][0]
    init_mounts = {m["mountPath"] for m in init["volumeMounts"]}
    assert {shm_dir, socket_dir, cfg.data_dir} <= init_mounts
    assert shm_dir in init["command"][-1] and socket_dir in init["command"][-1]


def test_metrics_port_service_and_servicemonitor_agree(pod: Any) -> None:
    _, container, cfg = pod
    port = int(cfg.server.metrics_listen.rsplit(":", 1)[1])
    assert cfg.server.metrics_listen.startswith("0.0.0.0:")  # scraped from other pods
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == port
    svc = k8s("Service", "kvstore-metrics")
    assert svc["spec"]["clusterIP"] == "None"  # every pod its own target
    [svc_port] = svc["spec"]["ports"]
    assert svc_port["targetPort"] == "metrics" and svc_port["port"] == port
    ds_labels = k8s("DaemonSet", "kvstore")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= ds_labels.items()

    monitoring = K8S / "monitoring"
    kust = yaml.safe_load((monitoring / "kustomization.yaml").read_text())
    assert kust["resources"] == ["servicemonitor.yaml"]  # (no "..": kustomize refuses it)
    sm = yaml.safe_load((monitoring / "servicemonitor.yaml").read_text())
    assert sm["kind"] == "ServiceMonitor" and sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    assert [e["port"] for e in sm["spec"]["endpoints"]] == [svc_port["name"]]
    # The pod's native probes stay on gRPC health; the metrics port is not a probe.
    assert container["readinessProbe"]["grpc"]["port"] != port


def test_compose_healthcheck_shm_and_engine_example() -> None:
    services = compose()["services"]
    kv = services["kvstore"]
    check = kv["healthcheck"]["test"]
    assert check[0] == "CMD-SHELL" and check[1].startswith("kvstore health ")
    assert check[1].endswith("|| exit 1")
    env = compose_env("kvstore")
    shm_dir = str(Path(env["KVSTORE_L1_SHM_PATH"]).parent)
    socket_dir = str(Path(env["KVSTORE_SERVER_UNIX_SOCKET"]).parent)
    shared = {f"{d}:{d}" for d in (shm_dir, socket_dir)}
    assert shared <= set(kv["volumes"])
    assert shared <= set(services["engine-example"]["volumes"])
    assert services["engine-example"]["user"].split(":")[0] == "10001"  # the files are 0600
    host_dirs = services["host-dirs"]
    assert shared <= set(host_dirs["volumes"])
    assert shm_dir in host_dirs["entrypoint"][-1] and socket_dir in host_dirs["entrypoint"][-1]
    assert kv["depends_on"]["host-dirs"]["condition"] == "service_completed_successfully"


def test_compose_prometheus_scrapes_kvstore_and_grafana_reads_prometheus() -> None:
    services = compose()["services"]
    metrics = compose_env("kvstore")["KVSTORE_SERVER_METRICS_LISTEN"]
    assert metrics.startswith("127.0.0.1:")  # only inside the shared network namespace
    for name in ("prometheus", "grafana"):
        assert services[name]["network_mode"] == "service:minio"
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]]
    assert targets == [metrics]
    prom_listen = next(a.split("=", 1)[1] for a in services["prometheus"]["command"]
                       if a.startswith("--web.listen-address="))
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    [ds] = datasource["datasources"]
    assert ds["url"] == f"http://{prom_listen}" and ds["type"] == "prometheus"
    # Every bind-mounted file exists.
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), volume
    published = " ".join(services["minio"]["ports"])
    assert "127.0.0.1:9090:9090" in published and "127.0.0.1:3000:3000" in published


def documented_metrics() -> set[str]:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    return set(re.findall(r"^\| `([a-z0-9_]+)` \|", doc, re.M))


def test_grafana_dashboard_uses_only_documented_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana" / "kvstore.json").read_text())
    documented = documented_metrics()
    series = set()
    for name in documented:
        series.add(name)
        if not name.endswith("_total"):  # histogram parts
            series.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    used: set[str] = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\b((?:kvstore|process)_[a-z0-9_]+)\b", target["expr"]))
            assert names, target["expr"]
            assert names <= series, (panel["title"], names - series)
            used |= names
    # the SDK's default transport and L3 throttling have panels too (the
    # dashboard showed only gRPC: an outage's refused data-plane Puts were invisible)
    for must in ("kvstore_tier_bytes", "kvstore_grpc_request_duration_seconds_bucket",
                 "kvstore_tier_hits_total", "kvstore_tier_available",
                 "kvstore_dataplane_errors_total", "kvstore_l3_request_failures_total",
                 "kvstore_l3_request_retries_total"):
        assert must in used
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "kvstore.yaml").read_text())
    mount = next(v for v in compose()["services"]["grafana"]["volumes"]
                 if v.startswith("./grafana/kvstore.json:"))
    assert mount.split(":")[1].startswith(provider["providers"][0]["options"]["path"] + "/")


def systemd_unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / "kvstore.service").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


def test_systemd_unit_runs_kvstore_serve_as_a_user_with_a_health_gate() -> None:
    unit = systemd_unit()
    service = unit["Service"]
    assert service["ExecStart"][0].split()[-2:] == ["kvstore", "serve"] or \
        service["ExecStart"][0].endswith("/kvstore serve")
    assert service["User"] != ["root"] and service["User"]
    env = dict(e.split("=", 1) for e in service["Environment"])
    assert env["KVSTORE_CONFIG"] == "/etc/kvstore/kvstore.toml"
    # The unit's header installs the example file there.
    cfg = load(env={**env, "KVSTORE_CONFIG": str(DEPLOY / "kvstore.example.toml")})
    assert float(service["TimeoutStopSec"][0]) > cfg.server.grace_seconds
    assert "kvstore health" in service["ExecStartPost"][0]
    assert f"unix:{cfg.server.unix_socket}" in service["ExecStartPost"][0]
    assert cfg.server.unix_socket.startswith("/run/" + service["RuntimeDirectory"][0] + "/")
    assert cfg.data_dir == "/var/lib/" + service["StateDirectory"][0]
    assert str(Path(cfg.l1.shm_path).parent) in service["ExecStartPre"][0]
    assert cfg.server.metrics_listen.startswith("127.0.0.1:")
    # No TCP listener: a loopback port is open to every user of the host,
    # whom the socket's and the arena's 0600 are meant to keep out.
    assert cfg.server.listen == "" and not cfg.auth.tokens_file
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = (DEPLOY / "systemd" / "kvstore.service").read_text()
    unit = tmp_path / "kvstore.service"
    unit.write_text(text.replace("/opt/kvstore/bin/kvstore", kvstore_command()))
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Unknown" not in out.stderr and "ignoring" not in out.stderr, out.stderr


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("directory", ["", "monitoring"])
def test_the_kustomizations_render(directory: str) -> None:
    """What the docs tell an operator to run, `kubectl apply -k deploy/k8s`
    and `-k deploy/k8s/monitoring`, renders (the monitoring one listed its
    parent directory, which kustomize refuses: "cycle detected")."""
    out = subprocess.run(["kubectl", "kustomize", str(K8S / directory)], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    kinds = [doc["kind"] for doc in yaml.safe_load_all(out.stdout) if doc]
    if directory:
        assert kinds == ["ServiceMonitor"]
    else:
        assert "DaemonSet" in kinds and "ServiceMonitor" not in kinds


def test_the_alert_rules_use_documented_metrics_and_load() -> None:
    """deploy/prometheus/alerts.yml: loaded by prometheus.yml and mounted by
    compose; every kvstore series it names is documented; promtool accepts
    it (where promtool is installed)."""
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["alerts.yml"]
    mounts = compose()["services"]["prometheus"]["volumes"]
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    documented = documented_metrics()
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"KvstoreDown", "KvstoreL3Unavailable", "KvstoreCorruptCopies"} <= names
    for group in rules["groups"]:
        for rule in group["rules"]:
            used = set(re.findall(r"\b(kvstore_[a-z0-9_]+)\b", rule["expr"]))
            assert used <= documented, (rule["alert"], used - documented)
            assert rule["annotations"]["summary"]
    promtool = shutil.which("promtool")
    if promtool is not None:
        done = subprocess.run([promtool, "check", "rules", str(DEPLOY / "prometheus" /
                                                               "alerts.yml")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
