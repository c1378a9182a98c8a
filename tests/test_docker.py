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
    assert set(svcs) == {"etcd", "prefill", "decode", "router"}
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


def test_single_node_compose_listens_beyond_loopback():
    s = _load("compose.yaml")["services"]["baton"]
    assert "--listen" in s["command"] and "0.0.0.0" in s["command"] and _gpus(s)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian's) validates compose files")
@pytest.mark.parametrize("name", ["compose.yaml", "compose.pd.yaml"])
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
