"""`make loadtest` for 20 seconds against a live node: locust's users stream over Triton gRPC and
through the OpenAI gateway, every request succeeds, TTFT / TPOT / ITL are recorded for both, and the
HTML report and PNG plots are written."""

import csv
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_make_loadtest_records_ttft_tpot_itl_for_both_users(node, qwen3_dir, tmp_path):
    out = tmp_path / "lt"
    r = subprocess.run(["make", "-s", "loadtest", f"TRITON={node.grpc_url}", f"OPENAI=http://{node.gateway_url}",
                        f"MODEL_NAME={qwen3_dir.resolve().name}", "USERS=4", "TIME=20s", "MAX_TOKENS=24",
                        f"LOADTEST_DIR={out}"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(out / "run_stats.csv") as f:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
    for name in ("llm", "/v1/completions"):
        for kind in ("TTFT", "TPOT", "ITL"):
            assert int(rows[(kind, name)]["Request Count"]) > 0, (kind, name)
    assert int(rows[("gRPC stream", "llm")]["Request Count"]) >= 10
    assert all(int(row["Failure Count"]) == 0 for row in rows.values()), rows
    for f in ("report.html", "run_latency.png", "run_tokens.png"):
        assert (out / f).stat().st_size > 1000, f
