import json
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fedtl.config import AdaptersConfig, FedTLConfig, ModelConfig
from fedtl.errors import ConfigError
from fedtl.federation import server
from fedtl.federation.records import to_record
from fedtl.federation.server import prepare_run_dir
from fedtl.federation.strategy import BoundedSuffixAggregation, RoundStats, SuffixFedAvg
from fedtl.model import TransferModel
from tests.conftest import make_tiny_backbone


def test_a_finished_run_is_never_overwritten_by_accident(tmp_path):
    out = tmp_path / "run"
    (out / "sites" / "site-0").mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    (out / "sites" / "site-0" / "privacy-ledger.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare_run_dir(out)
    assert (out / "summary.json").exists() and (out / "sites").exists()
    prepare_run_dir(out, overwrite=True)  # explicit: previous run files and simulated ledgers go
    assert not (out / "summary.json").exists() and not (out / "sites").exists()
    assert (out / "notes.txt").read_text() == "mine"


# ---- model selection ------------------------------------------------------------------------

W = "suffix.head.0.weight"
B = "suffix.head.0.bias"


def _tiny_model() -> TransferModel:
    return TransferModel(make_tiny_backbone(), 2, ModelConfig(), AdaptersConfig(kind="none", blocks=0))


def _split(informative: int, n: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled prefix features (n, 16) where only feature ``informative`` separates the classes (with overlap)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 16, generator=g)
    x[:, informative] += 1.2 * (2 * y - 1)
    return x, y


def _one_class() -> tuple[torch.Tensor, torch.Tensor]:
    """A validation split of class 0 only (its AUC is undefined); a larger weight on feature 0 lowers its loss."""
    x, y = _split(0)
    return x[y == 0], torch.zeros(int((y == 0).sum()), dtype=torch.int64)


def _head(dim_weights: dict[int, float]) -> dict[str, torch.Tensor]:
    """A head whose class-1 logit minus class-0 logit is sum_i w_i x_i."""
    w = torch.zeros(2, 16)
    for i, v in dim_weights.items():
        w[1, i], w[0, i] = v / 2, -v / 2
    return {W: w, B: torch.zeros(2)}


# Validation separates on feature 0, test on feature 1: the best validation round (2) is neither the best test
# round (1) nor the last one (4), so a summary taken from either of those would be caught.
SCRIPT = [_head({1: 1.0}), _head({0: 1.0}), _head({0: 0.5, 1: 0.5}), _head({0: -1.0, 1: 0.3})]


def _tracker(tmp_path, val, test) -> server.Tracker:
    model = _tiny_model()
    strategy = SuffixFedAvg(expected=model.expected_state())
    return server.Tracker(model, val, test, strategy, tmp_path / "metrics.jsonl")


def test_tracker_keeps_the_best_validation_round_by_auc(tmp_path):
    tracker = _tracker(tmp_path, _split(0), _split(1, seed=1))
    tracker(0, to_record(_tiny_model().trainable_state()))
    for r, state in enumerate(SCRIPT, start=1):
        tracker(r, to_record(state))
    val_auc = [row["val_auc"] for row in tracker.history]
    assert tracker.selection_metric == "val_auc"
    assert tracker.best_round == 2 == max(range(1, 5), key=lambda r: val_auc[r])
    assert torch.equal(tracker.best_state[W], SCRIPT[1][W]) and torch.equal(tracker.best_state[B], SCRIPT[1][B])
    assert val_auc[0] == 0.5  # round 0 (a zero head) is never selected


def test_one_class_validation_selects_by_lowest_loss_and_says_so_once(tmp_path, caplog):
    tracker = _tracker(tmp_path, _one_class(), _split(1, seed=1))
    with caplog.at_level(logging.WARNING, logger="fedtl.federation.server"):
        tracker(0, to_record(_tiny_model().trainable_state()))
        for r, state in enumerate([_head({0: 0.2}), _head({0: 2.0}), _head({0: -0.5}), _head({0: 1.0})], start=1):
            tracker(r, to_record(state))
    rows = tracker.history
    assert all(math.isnan(row["val_auc"]) for row in rows)
    assert tracker.selection_metric == "val_loss"
    assert tracker.best_round == min(range(1, 5), key=lambda r: rows[r]["val_loss"]) == 2
    ours = [rec.getMessage() for rec in caplog.records if rec.name == "fedtl.federation.server"]
    assert len(ours) == 1 and "lowest validation loss" in ours[0] and "30 example(s) of class(es) [0]" in ours[0]


def test_an_undefined_figure_never_leaves_a_trained_run_without_a_model(tmp_path):
    tracker = _tracker(tmp_path, _one_class(), _split(1, seed=1))
    tracker.selection_metric = "val_auc"  # as if round 0 had a defined AUC: every later one is NaN
    tracker(1, to_record(_head({0: 1.0})))
    assert tracker.best_round == 1  # the first trained round is kept rather than none
    tracker(2, to_record(_head({0: 2.0})))
    assert tracker.best_round == 1  # an undefined figure does not beat the kept round


def _fake_run(monkeypatch, tmp_path, val, test, script) -> dict:
    """run_server end to end with a tiny model, given features and a scripted sequence of global suffixes."""
    source = SimpleNamespace(num_classes=2, val=SimpleNamespace(labels=val[1].numpy()),
                             test=SimpleNamespace(labels=test[1].numpy()))
    features = {id(source.val): val[0], id(source.test): test[0]}
    monkeypatch.setattr(server, "load_source", lambda path: source)
    monkeypatch.setattr(server, "build_transfer_model", lambda cfg, n: _tiny_model())
    monkeypatch.setattr(server, "cached_features", lambda cfg, model, data: (features[id(data)], True))

    def aggregate(self, rnd, replies):
        self.rounds[rnd] = RoundStats(trained=["site-0"], epsilon={"site-0": 0.1 * rnd})
        return to_record(script[rnd - 1]), None

    monkeypatch.setattr(server, "_train_round", lambda grid, strategy, rnd, *args: [])
    monkeypatch.setattr(BoundedSuffixAggregation, "aggregate_train", aggregate)
    cfg = FedTLConfig().with_overrides({"federation.rounds": len(script), "federation.sites": 1,
                                        "output.dir": str(tmp_path / "run")})
    return server.run_server(None, cfg, "t", distribute_backbone=False)


def test_summary_and_saved_suffix_come_from_the_best_validation_round(monkeypatch, tmp_path):
    summary = _fake_run(monkeypatch, tmp_path, _split(0), _split(1, seed=1), SCRIPT)
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = max(rows[1:], key=lambda r: r["val_auc"])
    assert best["round"] == 2 and max(rows[1:], key=lambda r: r["test_auc"])["round"] != 2  # the script is informative
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["selected_round"] == 2 and summary["selection_metric"] == "val_auc"
    for key in ("test_auc", "test_acc", "val_auc", "val_acc", "val_loss"):
        assert summary[key] == best[key], key
    assert summary["final_round_test_auc"] == rows[-1]["test_auc"] != summary["test_auc"]
    saved = load_file(out / "suffix.safetensors")
    assert set(saved) == {W, B} and torch.equal(saved[W], SCRIPT[1][W]) and torch.equal(saved[B], SCRIPT[1][B])
    with safe_open(out / "suffix.safetensors", "pt") as fh:
        assert fh.metadata()["round"] == "2"


def test_a_one_class_validation_split_finishes_the_run_selected_by_loss(monkeypatch, tmp_path):
    script = [_head({0: 0.2}), _head({0: 2.0}), _head({0: -0.5})]
    summary = _fake_run(monkeypatch, tmp_path, _one_class(), _split(1, seed=1), script)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best = min(rows[1:], key=lambda r: r["val_loss"])
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["selection_metric"] == "val_loss" and math.isnan(on_disk["val_auc"])
    assert summary["selected_round"] == best["round"] == 2 and summary["test_auc"] == best["test_auc"]
    assert np.array_equal(load_file(tmp_path / "run" / "suffix.safetensors")[W].numpy(), script[1][W].numpy())
