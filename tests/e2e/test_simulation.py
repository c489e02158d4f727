"""A real Flower simulation (Ray backend) through the `fedtl` command, on a small real data set."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import write_small_medmnist

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _host_warning(line: str) -> bool:
    return "(raylet)" in line and ("file_system_monitor" in line or "memory_monitor" in line)


def _ray_processes() -> set[int]:
    found = set()
    for p in psutil.process_iter(["name", "cmdline"]):
        text = " ".join([p.info["name"] or ""] + (p.info["cmdline"] or []))
        if any(k in text for k in ("raylet", "gcs_server", "ray::", "ClientAppActor", "default_worker.py")):
            found.add(p.pid)
    return found


def test_three_sites_two_rounds_with_dp_and_a_site_out_of_budget(tmp_path):
    data = write_small_medmnist(tmp_path / "small.npz")
    out = tmp_path / "run"
    before = _ray_processes()
    env = dict(os.environ, FEDTL_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "fedtl.cli", "simulate", "--out", str(out), "--data", str(data),
           "--sites", "3", "--rounds", "2", "--set", "data.partitioner=iid", "--set", "adapters.kind=lora",
           "--set", "adapters.blocks=1", "--set", "privacy.site-epsilons=3,3,0.05",
           "--set", "personalization.kind=finetune", "--set", "personalization.epochs=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("test_auc", "test_acc", "rounds", "sites", "epsilon", "delta", "bytes_up_per_round",
                "bytes_down_per_round", "full_model_bytes", "trainable_params", "total_params", "wall_seconds", "cache_hit"):
        assert key in summary, key
    assert summary["rounds"] == 2 and summary["sites"] == 3
    assert 0.0 <= summary["test_auc"] <= 1.0 and 0.0 <= summary["test_acc"] <= 1.0
    # site 2's budget cannot pay for a round: it declines, the others carry on within theirs
    assert "site-2" in summary["declined"] and "will not train" in summary["declined"]["site-2"]
    assert 0 < summary["epsilon"]["site-0"] <= 3.0 and summary["epsilon"]["site-2"] == 0.0
    assert summary["bytes_up_per_round"] == 2 * summary["bytes_per_site_round"]
    # LoRA rank 4 on one unit + the head on mean, std and quadrant pooling (standardized training, since 2026-12-06):
    # 31,488 bytes a round against 2,833,544 for the whole cut model (1.1 %)
    assert summary["bytes_per_site_round"] < 0.02 * summary["full_model_bytes"]
    assert summary["trainable_params"] < summary["total_params"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert sorted(rows[1]["sites_trained"]) == ["site-0", "site-1"]
    assert (out / "suffix.safetensors").stat().st_size > 0
    ledger = json.loads((out / "sites" / "site-0" / "privacy-ledger.json").read_text())
    assert len(ledger["entries"]) == 2 + 1 and ledger["entries"][-1]["kind"] == "personalize"
    assert ledger["entries"][1]["epsilon"] == pytest.approx(summary["epsilon"]["site-0"])
    # personalization: each site fine-tuned the selected suffix under the budget it reserved from round 1 and
    # kept its personal suffix in its state dir; the server got figures only. Site 2 could not afford it.
    personal = summary["personalization"]
    assert set(personal["sites"]) == {"site-0", "site-1", "site-2"}
    for site in ("site-0", "site-1"):
        row = personal["sites"][site]
        assert row["personalized"] and 0 < row["epsilon"] <= 3.0 and row["kept"] in ("tuned", "global")
        assert (out / "sites" / site / "personal-suffix.safetensors").is_file()
        assert 0 <= row["personal_test_auc"] <= 1 and 0 <= row["global_test_auc"] <= 1
    assert ledger["epsilon"] == pytest.approx(personal["sites"]["site-0"]["epsilon"])
    assert "site-2" in personal["skipped"] and not (out / "sites" / "site-2" / "personal-suffix.safetensors").exists()
    assert personal["max_loss"] is not None
    # each site's ε, δ, accountant and budget as the site reported them; the randomness is named
    assert summary["privacy"]["site-0"] == {"epsilon": summary["epsilon"]["site-0"], "delta": 1e-5,
                                            "accountant": "rdp", "budget": 3.0}
    assert summary["privacy"]["site-2"]["budget"] == 0.05 and summary["accountants"] == ["rdp"]
    assert summary["randomness"] == "os" and json.loads((out / "config.json").read_text())["privacy.randomness"] == "os"
    assert rows[1]["privacy"]["site-1"]["accountant"] == "rdp"
    assert _ray_processes() <= before, "the simulation left Ray processes running"

    # the per-site table (each simulated site scored the selected suffix on its shares of val / test) and
    # the decision rule chosen on validation, stored with the suffix
    per_site = summary["per_site"]
    assert set(per_site["sites"]) == {"site-0", "site-1", "site-2"}
    assert sum(r["test_n"] for r in per_site["sites"].values()) == per_site["pooled"]["test_n"] == 80
    assert summary["evaluation"] == {"server_data": str(data), "sites": "final", "selected_by": "central",
                                     "headline": "central test split", "pooling": "avg-std-grid",
                                     "standardized_by": "the server's validation split (80 images)"}
    from safetensors import safe_open

    with safe_open(out / "suffix.safetensors", "pt") as fh:
        assert json.loads(fh.metadata()["fedtl.decision"]) == summary["decision"]
    # quiet output: one line per round and a short summary, none of Flower's or Ray's routine lines (25 lines here:
    # the summary and site table 8, feature caching 3, rounds 3, evaluation plan, feature statistics, 3 plan
    # warnings, site-2's 4 declines, personalization, run directory)
    # Ray's raylet warns about the host itself (a disk over 95 % full, memory pressure); those lines belong
    # to the machine the test runs on, not to fedtl's output, so they are not counted (CI's disk once was)
    output = proc.stdout + proc.stderr
    own = [line for line in output.splitlines() if not _host_warning(line)]
    assert len(own) <= 26, output
    from fedtl.federation.logs import FLOWER_NOISE
    assert not any(noise in output for noise in FLOWER_NOISE), output
    assert sum("Round " in line and "/2 |" in line for line in output.splitlines()) == 3, output
    for noise in ("configure_train", "aggregate_train", "DEPRECATED", "fraction_evaluate", "FutureWarning", "Traceback"):
        assert noise not in output, noise
    report = (out / "report.html").read_text()
    assert report.count("<svg") == 4 and "site-2" in report  # written at the end of the run
    assert "Personalization (local fine-tuning" in report

    # the same command again reuses the prefix cache; this time each site keeps a local head (personalization.kind =
    # local-head): trained in the rounds' DP steps, kept in its state dir, weighed after the last round, never sent
    proc = subprocess.run(cmd + ["--overwrite", "--set", "privacy.site-epsilons=", "--set",
                                 "personalization.kind=local-head"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cache_hit"] is True
    personal = summary["personalization"]
    assert personal["kind"] == "local-head" and set(personal["sites"]) == {"site-0", "site-1", "site-2"}
    ledger = json.loads((out / "sites" / "site-0" / "privacy-ledger.json").read_text())
    assert [e.get("kind", "round") for e in ledger["entries"]] == ["round", "round"]  # no ε of its own
    for site in ("site-0", "site-1", "site-2"):
        row = personal["sites"][site]
        assert row["personalized"] and row["kept"] in ("tuned", "global")
        assert (out / "sites" / site / "local-head.safetensors").is_file()
        assert (out / "sites" / site / "personal-suffix.safetensors").is_file()
        assert row["epsilon"] == pytest.approx(summary["epsilon"][site])
    assert "a local head trained in the rounds" in (out / "report.html").read_text()


@pytest.fixture
def ray_cluster():
    """A Ray head of its own on loopback (`ray start --head`), stopped afterwards: every process whose command
    line names its temporary folder (never `ray stop`, which would stop any other Ray of this user)."""
    import shutil
    import socket
    import tempfile
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="fedtl-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray = str(Path(sys.executable).parent / "ray")

    def ours() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            if any(temp in arg for arg in (p.info["cmdline"] or [])):
                found.append(p)
        return found

    try:
        subprocess.run([ray, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                        "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                       check=True, capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
        yield f"127.0.0.1:{port}", Path(temp)
    finally:
        procs = ours()
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
        time.sleep(0.5)
        left = ours()
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"Ray processes of the test's cluster left running: {[p.pid for p in left]}"


def test_simulate_attaches_to_an_existing_ray_cluster(tmp_path, ray_cluster):
    """`fedtl simulate --ray-address` runs the sites as actors of that cluster (Flower's `init_args`), starts no
    Ray of its own, and leaves the cluster running for the next study."""
    address, temp = ray_cluster
    data = write_small_medmnist(tmp_path / "small.npz", n_train=60, n_val=30, n_test=30)
    out = tmp_path / "run"
    env = dict(os.environ, FEDTL_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "fedtl.cli", "simulate", "--out", str(out), "--data", str(data), "--sites", "2",
           "--rounds", "1", "--set", "data.partitioner=iid", "--ray-address", address]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["sites"] == 2 and set(summary["epsilon"]) == {"site-0", "site-1"}
    sessions = list(temp.glob("session_2*/logs"))  # session_latest is a link to it
    assert len(sessions) == 1, sessions  # one cluster: the driver joined it instead of starting another
    workers = [p for p in sessions[0].glob("worker-*") if "ClientAppActor" in p.read_text(errors="replace")]
    assert workers, sorted(p.name for p in sessions[0].iterdir())  # the sites ran as actors of this cluster
    raylets = [p for p in psutil.process_iter(["cmdline"]) if "raylet" in " ".join(p.info["cmdline"] or [])
               and str(temp) in " ".join(p.info["cmdline"] or [])]
    assert raylets, "the cluster was stopped by the simulation"
