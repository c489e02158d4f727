"""The same ServerApp/ClientApp through `flwr run` against a real SuperLink in simulation mode."""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from fedtl.config import FedTLConfig
from fedtl.federation.site import build_transfer_model
from tests.conftest import write_small_medmnist

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flower_processes() -> set[int]:
    """flower-superlink/superexec and the simulation's Ray processes."""
    marks = ("flower-super", "flwr-simulation", "raylet", "gcs_server", "ray::", "default_worker.py")
    return {p.pid for p in psutil.process_iter(["cmdline"])
            if any(m in part for part in (p.info["cmdline"] or []) for m in marks)}


def test_flwr_run_two_sites_one_round(tmp_path):
    data = write_small_medmnist(tmp_path / "small.npz")
    out = tmp_path / "it's a \"run\""  # both quote kinds: the script passes output.dir as an escaped TOML string
    before = _flower_processes()
    env = dict(os.environ, FEDTL_CACHE_DIR=str(tmp_path / "cache"), FLWR_HOME=str(tmp_path / "flwr"),
               FEDTL_SUPERLINK_PORT=str(_free_port()))
    (tmp_path / "flwr").mkdir()
    proc = subprocess.run(["bash", str(ROOT / "simulations" / "flwr_run_local.sh"), str(out), "2", "1",
                           f"data.path='{data}' data.partitioner='iid'"], env=env, capture_output=True, text=True,
                          timeout=500, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sites"] == 2 and summary["rounds"] == 1 and set(summary["epsilon"]) == {"site-0", "site-1"}
    # Both sites trained: each spent some of its budget, none declined or was rejected, and the model moved.
    assert 0.0 < min(summary["epsilon"].values()) and max(summary["epsilon"].values()) <= 3.0
    assert summary["declined"] == {} and summary["rejected_updates"] == 0
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["sites_trained"] == ["site-0", "site-1"] and rounds[1]["failed"] == {}
    assert rounds[1]["bytes_up"] == 2 * summary["bytes_per_site_round"] > 0
    cfg = FedTLConfig.from_run_config(json.loads((out / "config.json").read_text()))
    initial = build_transfer_model(cfg, 2).trainable_state()
    saved = load_file(out / "suffix.safetensors")
    assert set(saved) == set(initial)
    assert any(not torch.equal(saved[k], initial[k]) for k in initial), "the saved suffix is the initial one"
    assert _flower_processes() <= before, "flwr run left a SuperLink or its simulation running"


def test_sigterm_stops_the_script_and_the_run_resumes_through_the_serverapp(tmp_path):
    """SIGTERM to the launcher script stops `flwr run` and the SuperLink's tree within 15 s; the same
    ServerApp started with output.resume=true continues the run from its checkpoint (each round once)."""
    from fedtl.federation.supervisor import checkpoint_round

    data = write_small_medmnist(tmp_path / "small.npz")
    out = tmp_path / "run"
    env = dict(os.environ, FEDTL_CACHE_DIR=str(tmp_path / "cache"), FLWR_HOME=str(tmp_path / "flwr"),
               FEDTL_SUPERLINK_PORT=str(_free_port()))
    (tmp_path / "flwr").mkdir()
    script = ["bash", str(ROOT / "simulations" / "flwr_run_local.sh"), str(out), "2", "4"]
    extra = f"data.path='{data}' data.partitioner='iid'"
    proc = subprocess.Popen(script + [extra], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    family: set = set()
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        try:
            family.update((p.pid, p.create_time()) for p in psutil.Process(proc.pid).children(recursive=True))
        except psutil.Error:
            pass
        if (out / "checkpoint.safetensors").exists() and checkpoint_round(out) != "?" and checkpoint_round(out) >= 1:
            break
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    else:
        raise AssertionError("no checkpoint of round 1")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=40)
    assert proc.returncode == 143 and time.monotonic() - t0 < 15, err[-2000:]
    assert "error: stopped by SIGTERM" in err and "output.resume=true" in err
    time.sleep(0.5)
    alive = []
    for pid, created in family:
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(" ".join(p.cmdline()[:3]))
        except psutil.Error:
            pass
    assert alive == [], alive
    assert not (out / "summary.json").exists()
    resumed = subprocess.run(script + [extra + " output.resume=true"], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=500)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    who = [{k: r.get(k) for k in ("round", "sites_trained", "declined", "failed", "timed_out", "rejected")}
           for r in rows]  # who took part in each round
    for site in ("site-0", "site-1"):
        ledger = json.loads((out / "sites" / site / "privacy-ledger.json").read_text())
        spent = [e["round"] for e in ledger["entries"]]
        trained = [r["round"] for r in rows if site in (r.get("sites_trained") or [])]
        # each round trained at most once, and every round the server counted is in the site's ledger (a site may
        # have paid for one the server did not count, never the reverse); a site whose ClientApp the SIGTERM killed
        # mid-round may miss that one round (the server, quorum 1, closed it with the other site)
        assert len(set(spent)) == len(spent) and set(trained) <= set(spent), (site, spent, who)
        assert len(trained) >= 3 and 4 in trained, (site, spent, who)
