"""Fault-tolerance figures: resume equals an uninterrupted run, checkpoint cost, time from a signal to exit.

    python simulations/benchmarks/fault_tolerance.py --out results/fault [--rounds 40 --kill-at 20]

1. An uninterrupted seeded run of the default configuration (``privacy.randomness=seeded``).
2. The same run, ``kill -9`` of its whole process group once round ``--kill-at`` is checkpointed,
   then ``fedtl simulate --resume``; metrics rows, selected round, suffix and every site's ε compared.
3. Checkpoint size and the time one save takes (from the resumed run's checkpoint).
4. SIGTERM to ``fedtl simulate`` mid-run: seconds until the command exited, processes left.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil


def _sim(out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "fedtl.cli", "simulate", "--out", str(out), "--set", "privacy.randomness=seeded", *extra]


def _wait_round(proc: subprocess.Popen, out: Path, rnd: int, family: set) -> None:
    from fedtl.federation.supervisor import checkpoint_round

    while True:
        try:
            family.update((p.pid, p.create_time()) for p in psutil.Process(proc.pid).children(recursive=True))
        except psutil.Error:
            pass
        r = checkpoint_round(out) if (out / "checkpoint.safetensors").exists() else -1
        if isinstance(r, int) and r >= rnd:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended before round {rnd}")
        time.sleep(0.2)


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--kill-at", type=int, default=20)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    extra = ["--rounds", str(args.rounds)] + [x for s in args.set for x in ("--set", s)]
    ref, killed, stopped = (args.out / n for n in ("reference", "killed", "sigterm"))
    res: dict = {}
    subprocess.run(_sim(ref, extra), check=True, capture_output=True)

    proc = subprocess.Popen(_sim(killed, extra), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    family: set = set()
    _wait_round(proc, killed, args.kill_at, family)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)
    for pid in _alive(family):
        psutil.Process(pid).kill()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedtl.cli", "simulate", "--resume", str(killed)], check=True,
                   capture_output=True)
    res["resume_seconds"] = round(time.perf_counter() - t0, 1)
    a = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    keys = ("val_auc", "val_acc", "val_loss", "test_auc", "test_acc", "test_loss")
    res["rounds_in_metrics"] = [r["round"] for r in b] == list(range(args.rounds + 1))
    res["max_metric_difference"] = max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in keys)
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (ref, killed))
    res["selected_round"] = [sa["selected_round"], sb["selected_round"]]
    res["test_auc"] = [sa["test_auc"], sb["test_auc"]]
    res["max_epsilon_difference"] = max(abs(sa["epsilon"][s] - sb["epsilon"][s]) for s in sa["epsilon"])
    from safetensors.torch import load_file

    ta, tb = load_file(ref / "suffix.safetensors"), load_file(killed / "suffix.safetensors")
    res["max_suffix_difference"] = max(float((ta[k] - tb[k]).abs().max()) for k in ta)

    from fedtl.federation.checkpoint import Checkpoint

    ckpt = Checkpoint.load(killed)
    t0 = time.perf_counter()
    for _ in range(20):
        size = ckpt.save(killed)
    res["checkpoint_bytes"] = size
    res["checkpoint_ms"] = round(1000 * (time.perf_counter() - t0) / 20, 2)

    proc = subprocess.Popen(_sim(stopped, extra), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    family = set()
    _wait_round(proc, stopped, 3, family)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    res["sigterm_to_exit_seconds"] = round(time.perf_counter() - t0, 2)
    res["sigterm_exit_code"] = proc.returncode
    time.sleep(0.5)
    res["processes_left"] = len(_alive(family))
    res["sigterm_message"] = err.strip().splitlines()[-1]
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
