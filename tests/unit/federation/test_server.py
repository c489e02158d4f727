import json
import logging
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fedtl.config import AdaptersConfig, FedTLConfig, ModelConfig
from fedtl.errors import ConfigError, FederationError
from fedtl.federation import server, tracking
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
    return TransferModel(make_tiny_backbone(), 2, ModelConfig(pooling="avg"), AdaptersConfig(kind="none", blocks=0))


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


def _tracker(tmp_path, val, test) -> tracking.Tracker:
    model = _tiny_model()
    strategy = SuffixFedAvg(expected=model.expected_state())
    return tracking.Tracker(model, val, test, strategy, tmp_path / "metrics.jsonl")


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
    with caplog.at_level(logging.WARNING, logger="fedtl.federation.tracking"):
        tracker(0, to_record(_tiny_model().trainable_state()))
        for r, state in enumerate([_head({0: 0.2}), _head({0: 2.0}), _head({0: -0.5}), _head({0: 1.0})], start=1):
            tracker(r, to_record(state))
    rows = tracker.history
    assert all(math.isnan(row["val_auc"]) for row in rows)
    assert tracker.selection_metric == "val_loss"
    assert tracker.best_round == min(range(1, 5), key=lambda r: rows[r]["val_loss"]) == 2
    ours = [rec.getMessage() for rec in caplog.records if rec.name == "fedtl.federation.tracking"]
    assert len(ours) == 1 and "lowest validation loss" in ours[0] and "30 example(s) of class(es) [0]" in ours[0]


def test_an_undefined_figure_never_leaves_a_trained_run_without_a_model(tmp_path):
    tracker = _tracker(tmp_path, _one_class(), _split(1, seed=1))
    tracker.selection_metric = "val_auc"  # as if round 0 had a defined AUC: every later one is NaN
    tracker(1, to_record(_head({0: 1.0})))
    assert tracker.best_round == 1  # the first trained round is kept rather than none
    tracker(2, to_record(_head({0: 2.0})))
    assert tracker.best_round == 1  # an undefined figure does not beat the kept round


def _fake_run(monkeypatch, tmp_path, val, test, script, *, stats=None, overrides=None, hits=(True, True),
              calls=None) -> dict:
    """run_server end to end with a tiny model, given features and a scripted sequence of global suffixes.

    ``stats(r)`` gives round r's RoundStats (default: site-0 trained, ε = 0.1 r); ``calls`` collects what
    the strategy was built and started with.
    """
    source = SimpleNamespace(num_classes=2, val=SimpleNamespace(labels=val[1].numpy()),
                             test=SimpleNamespace(labels=test[1].numpy()))
    features = {id(source.val): (val[0], hits[0]), id(source.test): (test[0], hits[1])}
    monkeypatch.setattr(tracking, "load_source", lambda path: source)
    monkeypatch.setattr(server, "build_transfer_model", lambda cfg, n: _tiny_model())
    monkeypatch.setattr(server, "eval_features", lambda cfg, model, data: features[id(data)])
    stats = stats or (lambda r: RoundStats(trained=["site-0"], epsilon={"site-0": 0.1 * r}))

    def train_round(grid, strategy, rnd, arrays, train_config, fed, out):
        if calls is not None and rnd == 1:
            calls.append({"grid": grid, "num_rounds": train_config["total-rounds"],
                          "train_config": dict(train_config), "strategy": strategy})
        return []

    def aggregate(self, rnd, replies):
        st = stats(rnd)
        st.privacy = st.privacy or {site: {"epsilon": eps, "delta": 1e-5, "accountant": "rdp", "budget": 3.0}
                                    for site, eps in st.epsilon.items()}
        self.rounds[rnd] = st
        return to_record(script[rnd - 1]), None

    monkeypatch.setattr(server, "_train_round", train_round)
    monkeypatch.setattr(BoundedSuffixAggregation, "aggregate_train", aggregate)
    cfg = FedTLConfig().with_overrides({"model.pooling": "avg", "federation.rounds": len(script), "federation.sites": 1,
                                        "output.dir": str(tmp_path / "run"), "evaluation.sites": "off",
                                        **(overrides or {})})
    return server.run_server(GRID, cfg, "t", distribute_backbone=False, demo_data=True)


GRID = object()  # stands in for Flower's Grid: run_server only hands it to the strategy


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
    n_val = len(_split(0)[1])
    assert summary["evaluation"]["standardized_by"] == f"the server's validation split ({n_val} images)"
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
    assert on_disk["selection_metric"] == "val_loss" and on_disk["val_auc"] is None  # strict JSON: NaN is written as null
    assert summary["selected_round"] == best["round"] == 2 and summary["test_auc"] == best["test_auc"]
    assert np.array_equal(load_file(tmp_path / "run" / "suffix.safetensors")[W].numpy(), script[1][W].numpy())


def test_every_summary_figure_and_metrics_row_is_what_the_rounds_produced(monkeypatch, tmp_path):
    def stats(r):
        return {1: RoundStats(bytes_down=300, bytes_up=200, trained=["site-0", "site-1"], epsilon={"site-0": 0.5, "site-1": 0.4},
                              rejected={"site-2": "NaN"}),
                2: RoundStats(bytes_down=300, bytes_up=100, trained=["site-1"], epsilon={"site-0": 0.5, "site-1": 0.9},
                              declined={"site-0": "budget spent"}, failed={"node-7": "timeout"}, rejected={"site-2": "x"}),
                3: RoundStats(bytes_down=150, bytes_up=0, epsilon={"site-1": 1.2}, declined={"site-1": "budget"},
                              rejected={"site-2": "x", "node-9": "y"})}[r]

    calls = []
    # min-sites 1, not FedAvg's own default of 2, so that a dropped argument shows
    overrides = {"federation.sites": 3, "federation.fraction-train": 0.5, "federation.min-sites": 1,
                 "privacy.target-epsilon": 2.5, "privacy.delta": 1e-6}
    summary = _fake_run(monkeypatch, tmp_path, _split(0), _split(1, seed=1), SCRIPT[:3], stats=stats,
                        overrides=overrides, calls=calls)
    out = tmp_path / "run"
    cfg = FedTLConfig().with_overrides({"model.pooling": "avg", "model.head": "linear", "federation.rounds": 3,
                                            "output.dir": str(out),
                                        "evaluation.sites": "off", **overrides})
    assert json.loads((out / "config.json").read_text()) == cfg.to_run_config()

    # What the strategy was built and started with.
    (call,) = calls
    strategy = call["strategy"]
    model = _tiny_model()
    assert call["grid"] is GRID and call["num_rounds"] == 3
    sent = dict(call["train_config"])
    mean, scale = (torch.tensor(sent.pop(k), dtype=torch.float64) for k in ("feature-mean", "feature-scale"))
    assert sent == {"total-rounds": 3, "run-id": "t", "num-classes": 2,
                    "backbone": "efficientnet_lite0", "backbone-sha256": model.weights_sha256,
                    "noise-multiplier": 0.0, "personalize-epochs": 0, "local-head": 0, "pooling": "avg", "head": "linear",
                    "reply-within": cfg.federation.round_timeout}  # sites that cannot answer in time do not spend
    # train.standardize = server: the statistics of the server's validation features, z-scores × the gain
    val = _split(0)[0].double()
    assert torch.allclose(mean, val.mean(0)) and torch.allclose(scale, val.std(0) / cfg.train.standardize_gain)
    assert strategy.expected == model.expected_state()
    # min-available is the quorum: the round loop waits (bounded) for the others itself
    assert (strategy.fraction_train, strategy.min_train_nodes, strategy.min_available_nodes) == (0.5, 1, 1)
    assert strategy.fraction_evaluate == 0.0  # the server evaluates centrally

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"round", "val_auc", "val_acc", "val_loss", "test_auc", "test_acc", "test_loss", "seconds",
                            "val_acc_argmax", "test_acc_argmax", "decision"}
    assert rows[2]["bytes_up"] == 100 and rows[2]["bytes_down"] == 300
    assert rows[2]["sites_trained"] == ["site-1"] and rows[2]["declined"] == {"site-0": "budget spent"}
    assert rows[2]["rejected"] == {"site-2": "x"} and rows[2]["failed"] == {"node-7": "timeout"}
    assert rows[1]["sites_trained"] == ["site-0", "site-1"] and rows[1]["epsilon"] == {"site-0": 0.5, "site-1": 0.4}
    assert all(0 <= r["seconds"] < 60 and r["seconds"] == round(r["seconds"], 3) for r in rows)
    assert [r["seconds"] for r in rows] == sorted(r["seconds"] for r in rows)

    # ε: each site's latest figure; a site missing from a round keeps its earlier one.
    assert summary["epsilon"] == {"site-0": 0.5, "site-1": 1.2} and summary["epsilon_max"] == 1.2
    assert (summary["dp"], summary["target_epsilon"], summary["delta"]) == (True, 2.5, 1e-6)
    assert (summary["rounds"], summary["sites"]) == (3, 3)
    assert summary["bytes_up_per_round"] == 100.0 and summary["bytes_down_per_round"] == 250.0
    assert summary["declined"] == {"site-0": "budget spent", "site-1": "budget"}
    assert summary["rejected_updates"] == 4
    counts = model.param_counts()
    assert summary["bytes_per_site_round"] == to_record(model.trainable_state()).count_bytes()
    assert summary["full_model_bytes"] == counts["full_model_bytes"]
    assert (summary["trainable_params"], summary["total_params"]) == (counts["trainable_params"], counts["total_params"])
    assert summary["bytes_per_site_round_fraction_of_model"] == summary["bytes_per_site_round"] / counts["full_model_bytes"]
    assert (summary["backbone"], summary["weights_sha256"], summary["split_after"]) == (
        "efficientnet_lite0", model.weights_sha256, model.split_name)
    assert summary["final_round_test_auc"] == rows[3]["test_auc"] and summary["final_round_test_acc"] == rows[3]["test_acc"]
    assert summary["cache_hit"] is True and 0 < summary["wall_seconds"] < 60
    with safe_open(out / "suffix.safetensors", "pt") as fh:
        assert fh.metadata() == {"backbone": "efficientnet_lite0", "weights_sha256": model.weights_sha256,
                                 "round": str(summary["selected_round"]), "split": model.split_name,
                                 "num_classes": "2", "run": summary["run_id"],  # what personal suffixes name
                                 "fedtl.decision": json.dumps(rows[summary["selected_round"]]["decision"], sort_keys=True)}
    assert summary["decision"] == rows[summary["selected_round"]]["decision"]


@pytest.mark.parametrize("hits,expected", [((True, True), True), ((False, True), False), ((True, False), False)])
def test_cache_hit_means_the_servers_feature_sets_came_from_the_cache(monkeypatch, tmp_path, hits, expected):
    # a site's cache state no longer leaves the site; `fedtl simulate` adds its own sites' caches
    summary = _fake_run(monkeypatch, tmp_path, _split(0), _split(1, seed=1), SCRIPT[:2], hits=hits)
    assert summary["cache_hit"] is expected


def test_without_dp_the_summary_has_no_privacy_figures(monkeypatch, tmp_path):
    summary = _fake_run(monkeypatch, tmp_path, _split(0), _split(1, seed=1), SCRIPT[:1],
                        overrides={"privacy.enabled": False}, stats=lambda r: RoundStats(trained=["site-0"]))
    assert summary["dp"] is False and summary["epsilon"] == {}
    assert summary["epsilon_max"] is None and summary["target_epsilon"] is None and summary["delta"] is None


def test_a_run_directory_holding_a_run_is_refused_before_anything_is_written(monkeypatch, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("mine\n")
    with pytest.raises(ConfigError, match="already holds a run"):
        _fake_run(monkeypatch, tmp_path, _split(0), _split(1, seed=1), SCRIPT[:1])
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"] and (out / "metrics.jsonl").read_text() == "mine\n"


def test_the_initial_model_is_never_selected_even_when_training_made_it_worse(tmp_path):
    tracker = _tracker(tmp_path, _split(0), _split(1, seed=1))
    tracker(0, to_record(_head({0: 1.0})))  # a good round-0 model (as a resumed or warm-started one could be)
    tracker(1, to_record(_head({0: -1.0})))
    tracker(2, to_record(_head({0: -0.5, 1: 1.0})))
    assert tracker.history[0]["val_auc"] > max(r["val_auc"] for r in tracker.history[1:])
    assert tracker.best_round == 2


def test_a_round_with_undefined_auc_never_replaces_a_defined_one(tmp_path):
    tracker = _tracker(tmp_path, _split(0), _split(1, seed=1))
    tracker(0, to_record(_tiny_model().trainable_state()))
    tracker(1, to_record(_head({0: 0.1, 1: 1.0})))
    two_classes, tracker.val = tracker.val, _one_class()  # as if round 2's validation figures were undefined
    tracker(2, to_record(_head({0: 1.0})))
    tracker.val = two_classes
    assert math.isnan(tracker.history[2]["val_auc"]) and tracker.best_round == 1


def test_the_tracker_reports_its_figures_to_flower(tmp_path):
    tracker = _tracker(tmp_path, _split(0), _split(1, seed=1))
    reported = tracker(1, to_record(_head({0: 1.0})))
    row = tracker.history[0]
    assert dict(reported) == {"val-auc": row["val_auc"], "val-acc": row["val_acc"], "test-auc": row["test_auc"],
                              "test-acc": row["test_acc"]}


# ---- backbone distribution ----------------------------------------------------------------------


@pytest.fixture
def task_identity(monkeypatch):
    """Flower stamps messages with the running task's identity; give the test process one."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class FakeGrid:
    """Sites answer the backbone queries as scripted: has it, installs it (or fails to), or errors."""

    def __init__(self, nodes_seen: list[list[int]], behaviour: dict[int, str]):
        self.nodes_seen, self.behaviour, self.sent = list(nodes_seen), behaviour, []

    def get_node_ids(self):
        return self.nodes_seen.pop(0) if len(self.nodes_seen) > 1 else self.nodes_seen[0]

    def send_and_receive(self, messages, timeout):
        from flwr.app import ConfigRecord, Error, Message, RecordDict

        messages = list(messages)
        self.sent.append((messages, timeout))
        replies = []
        for m in messages:
            node, action = m.metadata.dst_node_id, m.content["config"]["action"]
            kind = self.behaviour[node]
            if kind == "error" or (kind == "install-error" and action == "backbone-install"):
                replies.append(Message(error=Error(code=1, reason=f"node {node} unreachable"), reply_to=m))
                continue
            has = kind == "has" or (action == "backbone-install" and kind == "installs")
            error = "hash mismatch" if action == "backbone-install" and kind == "refuses" else ""
            replies.append(Message(RecordDict({"status": ConfigRecord({"has": has, "error": error})}), reply_to=m))
        assert [r.metadata.src_node_id for r in replies] == [m.metadata.dst_node_id for m in messages]
        return replies


def test_the_backbone_goes_only_to_sites_lacking_it_and_problems_are_reported(task_identity, monkeypatch, tmp_path, caplog):
    import fedtl.backbones

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"the weights")
    built = []
    monkeypatch.setattr(fedtl.backbones, "build_backbone",
                        lambda name: built.append(name) or SimpleNamespace(weights_path=weights))
    grid = FakeGrid([[1, 2, 3, 4, 5]], {1: "has", 2: "installs", 3: "refuses", 4: "error", 5: "install-error"})
    cfg = FedTLConfig()
    with caplog.at_level(logging.WARNING, logger="fedtl.federation.server"):
        problems = server.ensure_backbone(grid, cfg, "abc123", expected_sites=5, timeout=7.0)
    assert problems == {3: "hash mismatch", 4: "node 4 unreachable", 5: "node 5 unreachable"}
    assert built == ["efficientnet_lite0"]
    (asked, t1), (sent, t2) = grid.sent
    assert (t1, t2) == (7.0, 7.0)
    assert sorted(m.metadata.dst_node_id for m in asked) == [1, 2, 3, 4, 5]
    assert all(dict(m.content["config"]) == {"action": "backbone-status", "backbone": "efficientnet_lite0", "sha256": "abc123"}
               for m in asked)
    assert sorted(m.metadata.dst_node_id for m in sent) == [2, 3, 5]
    for m in sent:
        assert dict(m.content["config"]) == {"action": "backbone-install", "backbone": "efficientnet_lite0", "sha256": "abc123"}
        assert m.content["weights"]["file"].numpy().tobytes() == b"the weights"
        assert m.metadata.message_type == "query"
    assert "Node 3 cannot use the pinned backbone: hash mismatch" in caplog.text


def test_the_server_waits_for_the_expected_sites_then_sends_nothing_when_all_have_it(task_identity, monkeypatch):
    import fedtl.backbones

    monkeypatch.setattr(fedtl.backbones, "build_backbone", lambda name: pytest.fail("no site lacks the weights"))
    sleeps = []
    monkeypatch.setattr(server.time, "sleep", sleeps.append)
    grid = FakeGrid([[], [5], [5, 6]], {5: "has", 6: "has"})
    assert server.ensure_backbone(grid, FedTLConfig(), "abc", expected_sites=2, timeout=60) == {}
    assert sleeps == [1.0, 1.0] and len(grid.sent) == 1
    late = FakeGrid([[5]], {5: "has"})
    assert server.ensure_backbone(late, FedTLConfig(), "abc", expected_sites=3, timeout=0) == {}  # gives up waiting
    assert [m.metadata.dst_node_id for m in late.sent[0][0]] == [5]


def test_run_server_asks_every_site_for_the_pinned_backbone_first(monkeypatch, tmp_path):
    asked = []
    monkeypatch.setattr(server, "ensure_backbone",
                        lambda grid, cfg, sha, sites, **kw: asked.append((grid, cfg, sha, sites, kw["timeout"])))
    source = SimpleNamespace(num_classes=2, val=SimpleNamespace(labels=_split(0)[1].numpy()),
                             test=SimpleNamespace(labels=_split(1)[1].numpy()))
    monkeypatch.setattr(tracking, "load_source", lambda path: source)
    monkeypatch.setattr(server, "build_transfer_model", lambda cfg, n: _tiny_model())
    monkeypatch.setattr(server, "eval_features", lambda cfg, model, data: (_split(0)[0], True))
    monkeypatch.setattr(server, "_train_round", lambda *args: [])
    monkeypatch.setattr(BoundedSuffixAggregation, "aggregate_train",
                        lambda self, rnd, replies: (to_record(_tiny_model().trainable_state()), None))
    cfg = FedTLConfig().with_overrides({"model.pooling": "avg", "model.head": "linear", "federation.rounds": 1,
                                        "federation.sites": 4, "output.dir": str(tmp_path / "r"),
                                        "evaluation.sites": "off"})
    server.run_server(GRID, cfg, "t", demo_data=True)
    assert asked == [(GRID, cfg, _tiny_model().weights_sha256, 4, 300.0)]


def test_a_run_in_which_no_round_was_evaluated_fails_with_a_reason(monkeypatch, tmp_path):
    _fake_run(monkeypatch, tmp_path, _split(0), _split(1, seed=1), SCRIPT[:1])  # installs the fakes
    monkeypatch.setattr(tracking.Tracker, "__call__", lambda self, rnd, arrays: self.history.append({"round": rnd}))
    cfg = FedTLConfig().with_overrides({"model.pooling": "avg", "federation.rounds": 1, "output.dir": str(tmp_path / "r2"),
                                        "evaluation.sites": "off"})
    with pytest.raises(FederationError, match="No round produced a global model; see the log for the sites' reasons."):
        server.run_server(GRID, cfg, "t", distribute_backbone=False, demo_data=True)
    assert not (tmp_path / "r2" / "summary.json").exists()


def test_output_folders_nested_existing_or_by_default_timestamped(monkeypatch, tmp_path):
    nested = tmp_path / "a" / "b" / "run"
    _fake_run(monkeypatch, tmp_path, _split(0), _split(1, seed=1), SCRIPT[:1], overrides={"output.dir": str(nested)})
    assert (nested / "summary.json").is_file()
    (tmp_path / "empty").mkdir()
    _fake_run(monkeypatch, tmp_path, _split(0), _split(1, seed=1), SCRIPT[:1], overrides={"output.dir": str(tmp_path / "empty")})
    assert (tmp_path / "empty" / "summary.json").is_file()
    monkeypatch.chdir(tmp_path)
    _fake_run(monkeypatch, tmp_path, _split(0), _split(1, seed=1), SCRIPT[:1], overrides={"output.dir": ""})
    (made,) = list((tmp_path / "runs").iterdir())
    assert re.fullmatch(r"20\d{6}-\d{6}-t", made.name) and (made / "summary.json").is_file()


def test_prepare_run_dir_creates_nested_folders_and_names_what_it_found(tmp_path):
    assert prepare_run_dir(tmp_path / "x" / "y").is_dir()
    (tmp_path / "x" / "y" / "summary.json").write_text("{}")
    (tmp_path / "x" / "y" / "sites").mkdir()
    with pytest.raises(ConfigError, match=r"already holds a run \(summary.json, sites\); choose another output "
                                          r"directory or pass --overwrite."):
        prepare_run_dir(tmp_path / "x" / "y")


def test_a_file_where_the_run_directory_should_be_is_refused(tmp_path):
    (tmp_path / "run").write_text("mine")
    with pytest.raises(ConfigError, match="`output.dir` .*run exists and is not a directory."):
        prepare_run_dir(tmp_path / "run")
    assert (tmp_path / "run").read_text() == "mine"


def test_a_multiclass_round_gets_offsets_chosen_on_validation_and_reports_both_accuracies(tmp_path):
    # 3 classes; the head is biased toward class 0 (as a model trained on another class mix would be): the
    # tracker's bias rule, chosen on validation only, must recover accuracy that the argmax loses on test.
    model = TransferModel(make_tiny_backbone(), 3, ModelConfig(pooling="avg"), AdaptersConfig(kind="none", blocks=0))

    def split(seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(150) % 3
        x = torch.randn(150, 16, generator=g)
        x[torch.arange(150), y] += 1.5
        return x, y

    w = torch.zeros(3, 16)
    w[0, 0], w[1, 1], w[2, 2] = 1.0, 1.0, 1.0
    state = {W: w, B: torch.tensor([2.0, 0.0, 0.0])}
    tracker = tracking.Tracker(model, split(0), split(1), SuffixFedAvg(expected=model.expected_state()),
                             tmp_path / "metrics.jsonl", num_classes=3)
    tracker(1, to_record(state))
    row = tracker.history[-1]
    assert row["decision"]["rule"] == "bias" and row["decision"]["chosen-on"] == "central validation (150 images)"
    assert row["test_acc"] > row["test_acc_argmax"] + 0.1
    argmax = tracking.Tracker(model, split(0), split(1), SuffixFedAvg(expected=model.expected_state()),
                            tmp_path / "m2.jsonl", num_classes=3, decision_mode="argmax")
    argmax(1, to_record(state))
    assert argmax.history[-1]["decision"] == {"rule": "argmax"}


def test_auto_pooling_is_decided_once_by_the_server_written_to_config_json_and_sent(monkeypatch, tmp_path):
    calls = []
    _fake_run(monkeypatch, tmp_path, _split(0), _split(1, seed=1), SCRIPT[:1], overrides={"model.pooling": "auto"},
              calls=calls)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model.pooling"] == "avg-std-grid"
    assert calls[0]["train_config"]["pooling"] == "avg-std-grid"  # the server has validation data: standardized


def test_auto_head_is_decided_once_by_the_server_from_its_labels_written_to_config_json_and_sent(monkeypatch, tmp_path,
                                                                                                 caplog):
    for labels, head in (("graded", "ordinal"), ("auto", "linear")):  # auto: the demo data declare no grades
        calls = []
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fedtl.federation.server"):
            _fake_run(monkeypatch, tmp_path / labels, _split(0), _split(1, seed=1), SCRIPT[:1],
                      overrides={"data.labels": labels}, calls=calls)
        assert json.loads((tmp_path / labels / "run" / "config.json").read_text())["model.head"] == head
        assert calls[0]["train_config"]["head"] == head, labels
        assert f"model.head = auto: the {head} head" in caplog.text  # the user is told which, and why


class PushGrid:
    """A deployment grid as Flower 1.41's: push sets each message's id; node 20 has stopped, so the SuperLink answers
    for it with a Node Unavailable error whose source is the SuperLink's own node id (1), not node 20."""

    def __init__(self):
        self.replies = {}

    def get_node_ids(self):
        return [10, 20]

    def push_messages(self, messages):
        from flwr.app import ConfigRecord, Error, Message, RecordDict

        ids = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{i}"
            if m.metadata.dst_node_id == 20:
                reply = Message(error=Error(code=5, reason="Error: Node Unavailable — no heartbeat"), reply_to=m)
                reply.metadata.__dict__["_src_node_id"] = 1  # as linkstate.utils writes it: SUPERLINK_NODE_ID
            else:
                reply = Message(RecordDict({"info": ConfigRecord({"site": "st-mary"})}), reply_to=m)
            self.replies[m.metadata.message_id] = reply
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def test_a_site_that_stopped_is_named_as_failed_not_as_silent_and_not_as_the_superlink(task_identity, tmp_path, caplog):
    """A deployment trial: after a site was killed, the round said "no reply within 300 s from site2" 15 s in, and
    recorded the failure under `node-1` (the SuperLink). Replies are matched to sites by the message they answer."""
    from flwr.app import ArrayRecord, ConfigRecord

    strategy = SuffixFedAvg({}, fraction_train=1.0, min_available_nodes=1, min_train_nodes=1)
    strategy.node_sites[20] = "site2"
    fed = FedTLConfig().with_overrides({"federation.sites": 2, "federation.min-sites": 1}).federation
    with caplog.at_level(logging.WARNING):
        replies = server._train_round(PushGrid(), strategy, 1, ArrayRecord(), ConfigRecord({}), fed, tmp_path)
        assert len(replies) == 2 and strategy.rounds[1].timed_out == []
        assert "no reply within" not in caplog.text
        assert [strategy.reply_node(r) for r in replies if r.has_error()] == [20]
        strategy._admit(1, next(r for r in replies if r.has_error()), strategy.rounds[1])
    assert list(strategy.rounds[1].failed) == ["site2"] and "Node Unavailable" in strategy.rounds[1].failed["site2"]
    assert "Round 1: site2 (node 20) failed: Error: Node Unavailable" in caplog.text


def test_resume_takes_a_run_from_before_a_key_was_added_but_not_one_whose_config_changed(tmp_path):
    import torch

    from fedtl.federation.checkpoint import Checkpoint

    cfg = FedTLConfig().with_overrides({"model.pooling": "avg", "model.head": "linear", "federation.rounds": 3})
    older = {k: v for k, v in cfg.to_run_config().items() if k != "data.labels"}  # written before data.labels existed
    Checkpoint(round=1, run_id="r", config=older, global_state={"w": torch.zeros(2)}).save(tmp_path)
    assert server.load_for_resume(tmp_path, cfg).round == 1  # the new key at its default: the same run
    for changed, key in (({"federation.rounds": 4}, "federation.rounds"), ({"data.labels": "graded"}, "data.labels")):
        with pytest.raises(ConfigError, match=f"differs from the interrupted run's in {key}"):
            server.load_for_resume(tmp_path, cfg.with_overrides(changed))


def test_the_runs_class_names_are_sent_with_every_train_request(monkeypatch, tmp_path):
    calls = []
    _fake_run(monkeypatch, tmp_path, _split(0), _split(1, seed=1), SCRIPT[:1],
              overrides={"model.class-names": "normal, pneumonia"}, calls=calls)
    assert calls[0]["train_config"]["class-names"] == "normal,pneumonia"
    calls.clear()
    _fake_run(monkeypatch, tmp_path / "unnamed", _split(0), _split(1, seed=1), SCRIPT[:1], calls=calls)
    assert "class-names" not in calls[0]["train_config"]  # none given: the sites are not asked to check


def test_a_report_that_cannot_be_written_is_logged_and_the_finished_run_stands(tmp_path, monkeypatch, caplog):
    import fedtl.report

    def broken(run_dir, out=None):
        raise OSError("disk full")

    monkeypatch.setattr(fedtl.report, "write_report", broken)
    with caplog.at_level(logging.WARNING, logger="fedtl.federation.server"):
        assert server.write_run_report(tmp_path) is None
    assert "The report was not written (disk full)" in caplog.text and f"fedtl report {tmp_path}" in caplog.text
