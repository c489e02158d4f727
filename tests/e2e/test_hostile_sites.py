"""A real Flower simulation with a hostile ClientApp among honest ones (``tests/e2e/hostile_app.py``).

Site 0 of 5 attacks in every round, a different attack each round: sign-flipped ×100, scaled ×10⁶,
−50 with a claimed 10¹² examples, NaN, random noise, gradient ascent (label flip), a stale replay,
malformed metrics. The run completes, each hostile reply is rejected or bounded (named per round
in metrics.jsonl), and the test AUC stays within 0.01 of the same run without the attacker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedtl.config import FedTLConfig
from tests.conftest import write_small_medmnist
from tests.e2e.hostile_app import ATTACKS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
ROUNDS = len(ATTACKS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile-sites")
    data = write_small_medmnist(base / "small.npz", n_train=400, n_val=120, n_test=200)
    env = dict(os.environ, FEDTL_CACHE_DIR=str(base / "cache"))
    out = {}
    for kind in ("clean", "hostile"):
        cfg = FedTLConfig().with_overrides({
            "data.path": str(data), "data.partitioner": "iid", "federation.sites": 5, "federation.rounds": ROUNDS,
            "privacy.randomness": "seeded", "output.dir": str(base / kind)})
        path = base / f"{kind}.json"
        path.write_text(json.dumps(cfg.to_run_config()))
        proc = subprocess.run([sys.executable, "-m", "tests.e2e.hostile_app", str(path), str(base / kind)]
                              + (["--clean"] if kind == "clean" else []), env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[kind] = base / kind
    return out


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_every_hostile_reply_is_rejected_or_bounded(runs):
    rows = _rows(runs["hostile"])
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    for row in rows[1:]:
        attack = ATTACKS[(row["round"] - 1) % len(ATTACKS)]
        honest = {f"site-{i}" for i in range(1, 5)}
        assert honest <= set(row["sites_trained"]), (attack, row["sites_trained"])
        if attack in ("scale", "nan", "bad_metrics"):
            assert "site-0" in row["rejected"] and "site-0" not in row["sites_trained"], (attack, row)
        elif attack in ("sign_flip", "huge_weight"):
            assert "site-0" in row["bounded"] or "site-0" in row["capped"] or "site-0" in row["rejected"], (attack, row)
        # noise, label flip and stale replay look like updates: bounded by the clip when they are large
        assert all(v == v for k, v in row.items() if k.endswith("_auc"))  # finite figures every round


def test_the_attacker_moves_test_auc_by_at_most_0_01(runs):
    clean = json.loads((runs["clean"] / "summary.json").read_text())
    hostile = json.loads((runs["hostile"] / "summary.json").read_text())
    assert hostile["rounds"] == ROUNDS and hostile["aggregation"] == "multikrum"
    assert clean["test_auc"] - hostile["test_auc"] <= 0.01, (clean["test_auc"], hostile["test_auc"])
    assert sum(len(v) for v in hostile["rejected"].values()) >= 3
