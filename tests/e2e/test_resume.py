"""Crash, stop and resume `fedtl simulate`: a resumed run equals an uninterrupted one, no ε is spent twice,
and every signal stops the whole process tree within 15 s.

One uninterrupted seeded run is the reference for the module; each interrupted run is compared to it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from fedtl.federation.supervisor import checkpoint_round
from tests.conftest import write_small_medmnist

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROUNDS = 6
PARTICIPATION = ("sites_trained", "declined", "rejected", "failed", "timed_out")


def _cmd(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "fedtl.cli", "simulate", "--out", str(out), "--data", str(data), "--sites", "3",
            "--rounds", str(ROUNDS), "--set", "data.partitioner=iid", "--set", "privacy.randomness=seeded",
            "--set", "federation.round-timeout=600"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    data = write_small_medmnist(base / "small.npz")
    e = dict(os.environ, FEDTL_CACHE_DIR=str(base / "cache"))
    e.pop("FEDTL_SIMULATE_CHILD", None)
    return base, data, e


@pytest.fixture(scope="module")
def reference(env):
    base, data, e = env
    out = base / "reference"
    proc = subprocess.run(_cmd(data, out), env=e, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("seconds", "attempts")}


def _assert_same_run(resumed: Path, reference: Path) -> None:
    a, b = _rows(resumed), _rows(reference)
    assert [r["round"] for r in a] == list(range(ROUNDS + 1))  # each round once
    for x, y in zip(a, b):  # who took part first: a site that timed out on a slow machine changes every figure
        for k in PARTICIPATION:
            assert x.get(k) == y.get(k), (x["round"], k, x.get(k), y.get(k))
    for x, y in zip(a, b):
        x, y = _comparable(x), _comparable(y)
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float):
                assert x[k] == pytest.approx(y[k], abs=1e-6), (x["round"], k)
            else:
                assert x[k] == y[k], (x["round"], k)
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (resumed, reference))
    assert sa["selected_round"] == sb["selected_round"]
    assert sa["epsilon"] == pytest.approx(sb["epsilon"], abs=1e-12)  # no round spent twice
    ta, tb = load_file(resumed / "suffix.safetensors"), load_file(reference / "suffix.safetensors")
    assert all((ta[k] - tb[k]).abs().max() <= 1e-6 for k in tb)
    for site in sb["epsilon"]:
        ledger = json.loads((resumed / "sites" / site / "privacy-ledger.json").read_text())
        assert [e["round"] for e in ledger["entries"]] == list(range(1, ROUNDS + 1)), site


def _start(data: Path, out: Path, e: dict) -> tuple[subprocess.Popen, set]:
    proc = subprocess.Popen(_cmd(data, out), env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    return proc, set()


def _wait_for_round(proc: subprocess.Popen, out: Path, rnd: int, family: set, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            family.update((p.pid, p.create_time()) for p in psutil.Process(proc.pid).children(recursive=True))
        except psutil.Error:
            pass
        got = checkpoint_round(out) if (out / "checkpoint.safetensors").exists() else -1
        if isinstance(got, int) and got >= rnd:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint of round {rnd} within {timeout} s")


def _alive(family: set) -> list[int]:
    out = []
    for pid, created in family:
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def _resume(out: Path, e: dict) -> None:
    proc = subprocess.run([sys.executable, "-m", "fedtl.cli", "simulate", "--resume", str(out)], env=e,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_every_process_and_the_run_resumes_to_the_same_result(env, reference, sig, code):
    base, data, e = env
    out = base / f"stopped-{sig.name}"
    proc, family = _start(data, out, e)
    _wait_for_round(proc, out, 2, family)
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    took = time.monotonic() - t0
    assert proc.returncode == code, err[-3000:]
    assert took < 15, took
    assert f"the run can be resumed: fedtl simulate --resume {out}" in err
    time.sleep(0.5)
    assert _alive(family) == [], "a process of the stopped simulation is still running"
    assert "Traceback" not in err
    _resume(out, e)
    _assert_same_run(out, reference)


def test_kill_9_of_the_process_group_then_resume_equals_the_uninterrupted_run(env, reference):
    base, data, e = env
    out = base / "killed"
    proc, family = _start(data, out, e)
    _wait_for_round(proc, out, 3, family)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 15  # the child dies with its supervisor (PDEATHSIG); Ray's daemons follow
    while _alive(family) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _alive(family):  # whatever a SIGKILL orphaned (nothing can catch SIGKILL): cleared for the next run
        psutil.Process(pid).kill()
    stopped = checkpoint_round(out)
    assert stopped >= 3 and not (out / "summary.json").exists()
    _resume(out, e)
    _assert_same_run(out, reference)
    # the resume is on record: summary.json and the report (a trial's report did not say its run was resumed)
    assert json.loads((out / "summary.json").read_text())["resumed_after_rounds"] == [stopped]
    assert json.loads((reference / "summary.json").read_text())["resumed_after_rounds"] == []
    assert f"after round {stopped} (the server stopped" in (out / "report.html").read_text()


def test_resume_refuses_a_completed_run_and_a_folder_without_a_run(env, reference, tmp_path):
    _, _, e = env
    done = subprocess.run([sys.executable, "-m", "fedtl.cli", "simulate", "--resume", str(reference)], env=e,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "holds a completed run" in done.stderr
    empty = subprocess.run([sys.executable, "-m", "fedtl.cli", "simulate", "--resume", str(tmp_path)], env=e,
                           capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2 and "nothing to resume" in empty.stderr
