"""Federated evaluation: what a site sends, what the server accepts from it, thresholds, pooled figures.

Every reply is untrusted input: hostile ones (extra keys, impossible figures, histograms that do not
add up, a claimed n of 10¹²) are rejected or bounded, never crash a round, never decide a pooled figure.
"""

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from safetensors import safe_open

from fedtl.decision import decision_from_metadata
from fedtl.errors import ConfigError
from fedtl.evaluation import (HIST_BINS, Decision, decision_of, pooled, score_histograms, stratified_split,
                              threshold_from_histograms)
from fedtl.federation import server, tracking
from fedtl.federation.fedeval import (EVAL_METRIC_KEYS, EvalRequest, SiteEvaluation, accuracy_at, eval_reply,
                                      evaluate_at_sites, parse_eval_reply)
from fedtl.federation.records import to_record
from fedtl.federation.site import evaluate_site, share_like, SiteEvalData
from fedtl.federation.strategy import SuffixFedAvg
from tests.unit.federation.test_server import _head, _split, _tiny_model, task_identity  # noqa: F401


def _scores(n_neg, n_pos, seed=0):
    rng = np.random.default_rng(seed)
    s = np.concatenate([rng.beta(2, 5, n_neg), rng.beta(5, 2, n_pos)])
    y = np.concatenate([np.zeros(n_neg, int), np.ones(n_pos, int)])
    return s, y


def test_the_threshold_maximises_balanced_accuracy_and_ignores_the_class_mix():
    s, y = _scores(300, 300)
    neg, pos = score_histograms(s, y)
    t = threshold_from_histograms(neg, pos)
    edges = np.arange(HIST_BINS + 1) / HIST_BINS
    balanced = [(np.mean(s[y == 1] >= e) + np.mean(s[y == 0] < e)) / 2 for e in edges]
    assert t in edges and math.isclose((np.mean(s[y == 1] >= t) + np.mean(s[y == 0] < t)) / 2, max(balanced))
    # ten times more positives: the same score distributions per class give the same threshold
    s2, y2 = np.concatenate([s[y == 0], np.repeat(s[y == 1], 10)]), np.concatenate([y[y == 0], np.ones(3000, int)])
    assert threshold_from_histograms(*score_histograms(s2, y2)) == t
    # a model trained on a skewed mix: scores shifted up; argmax (0.5) is wrong, the threshold follows
    shifted = np.clip(s + 0.3, 0, 1)
    t_shift = threshold_from_histograms(*score_histograms(shifted, y))
    assert t_shift > 0.6
    acc_at = lambda th: np.mean((shifted >= th) == y)  # noqa: E731
    assert acc_at(t_shift) > acc_at(0.5) + 0.1
    assert threshold_from_histograms([0] * HIST_BINS, pos) is None  # one class: no threshold


def test_the_threshold_is_the_middle_of_the_near_best_edges_and_moves_less_than_the_best_edge():
    from fedtl.evaluation import PLATEAU_SE

    # separable classes: every edge from 0.2 to 0.6 is best; the threshold is their middle, 0.4 (not the edge nearest
    # 0.5, nor either end)
    neg, pos = np.zeros(HIST_BINS, int), np.zeros(HIST_BINS, int)
    neg[:10], pos[30:] = 5, 5
    assert threshold_from_histograms(neg, pos) == 0.4
    # validation sets of 262 images drawn from one model's score distributions: the best single edge jumps between
    # draws; the middle of the edges within PLATEAU_SE standard errors of it moves about half as much
    edges = np.arange(HIST_BINS + 1) / HIST_BINS
    chosen, best = [], []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        s = np.concatenate([rng.beta(2, 4, 70), rng.beta(4, 2, 192)])
        y = np.concatenate([np.zeros(70, int), np.ones(192, int)])
        t = threshold_from_histograms(*score_histograms(s, y))
        j = np.array([np.mean(s[y == 1] >= e) + np.mean(s[y == 0] < e) for e in edges])
        b = int(np.argmax(j))
        tpr, tnr = np.mean(s[y == 1] >= edges[b]), np.mean(s[y == 0] < edges[b])
        se = math.sqrt(tpr * (1 - tpr) / 192 + tnr * (1 - tnr) / 70)
        assert t in edges and j[int(round(t * HIST_BINS))] >= j[b] - PLATEAU_SE * se - 1e-9  # near-best
        chosen.append(t)
        best.append(edges[b])
    assert np.std(chosen) < 0.7 * np.std(best), (np.std(chosen), np.std(best))


def test_accuracy_from_histograms_equals_accuracy_on_the_scores():
    s, y = _scores(120, 80, seed=3)
    neg, pos = score_histograms(s, y)
    fig = {"hist_neg": np.array(neg), "hist_pos": np.array(pos)}
    for t in (0.0, 0.3, 0.5, 0.72, 1.0):
        exact = np.mean(Decision("threshold", t).apply(np.stack([1 - s, s], 1)) == y)
        assert math.isclose(accuracy_at(fig, t), exact), t


def test_a_decision_survives_metadata_and_garbage_means_argmax():
    d = Decision("threshold", 0.64, 1, "central validation (10 images)")
    assert decision_of(d.to_dict()) == d and decision_of(None) == Decision()
    probs = np.array([[0.4, 0.6], [0.3, 0.7]])
    assert d.apply(probs).tolist() == [0, 1] and Decision().apply(probs).tolist() == [1, 1]
    for junk in ({"rule": "threshold", "threshold": "nan"}, {"rule": "threshold", "threshold": 7},
                 {"rule": "threshold"}, {"rule": "median"}):
        with pytest.raises(ConfigError):  # a damaged record is an error, never a silent argmax
            decision_of(junk)


def test_stratified_split_is_disjoint_covering_reproducible_and_keeps_each_class():
    labels = np.array([0] * 50 + [1] * 10 + [2] * 2)
    a, b = stratified_split(labels, 0.2, seed=5)
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(62)) and not set(a) & set(b)
    assert np.bincount(labels[a], minlength=3).tolist() == [10, 2, 1]
    assert np.array_equal(a, stratified_split(labels, 0.2, seed=5)[0])
    assert not np.array_equal(a, stratified_split(labels, 0.2, seed=6)[0])


def test_each_simulated_site_is_evaluated_on_data_drawn_like_its_training_data():
    train = [np.array([0] * 90 + [1] * 10), np.array([0] * 10 + [1] * 90), np.array([1] * 50)]
    labels = np.array([0] * 100 + [1] * 150)
    parts = share_like(train, labels, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(250))  # disjoint and covering
    counts = [np.bincount(labels[p], minlength=2) for p in parts]
    assert counts[0][0] == 90 and counts[1][0] == 10 and counts[2][0] == 0  # class 0 as in training: 90/10/0
    assert counts[2][1] == 50 and counts[0][1] == 10


# ---- the reply: what a site sends, what the server accepts --------------------------------------------

def _figs(n=40, seed=0):
    s, y = _scores(n // 2, n // 2, seed)
    neg, pos = score_histograms(s, y)
    return {"n": n, "auc": 0.9, "acc": 0.8, "loss": 0.4, "hist_neg": neg, "hist_pos": pos}


def test_a_sites_reply_round_trips_and_an_opt_out_carries_no_figures():
    reply = eval_reply({"val": _figs(40), "test": _figs(60, 1)}, site="st-mary")
    assert set(reply["metrics"].keys()) == set(EVAL_METRIC_KEYS)
    site, figs, _ = parse_eval_reply(reply, num_classes=2)
    assert site == "st-mary" and figs["test"]["n"] == 60 and figs["val"]["auc"] == 0.9
    assert int(figs["test"]["hist_neg"].sum() + figs["test"]["hist_pos"].sum()) == 60
    site, figs, reason = parse_eval_reply(eval_reply(None, site="x", reason="this site does not evaluate"), 2)
    assert figs is None and reason == "this site does not evaluate"
    one_class = eval_reply({"val": {**_figs(), "auc": float("nan")}, "test": _figs()}, site="y")
    assert math.isnan(parse_eval_reply(one_class, 2)[1]["val"]["auc"])  # undefined AUC travels as -1


def _tamper(**changes) -> RecordDict:
    reply = eval_reply({"val": _figs(), "test": _figs()}, site="evil")
    values = dict(reply["metrics"])
    for key, value in changes.items():
        if value is None:
            values.pop(key)
        else:
            values[key] = value
    return RecordDict({"metrics": MetricRecord(values), "info": reply["info"]})


@pytest.mark.parametrize("changes,match", [
    ({"extra-key": 1.0}, "unexpected"), ({"val-auc": None}, "missing"),
    ({"val-auc": 2.0}, "val-auc"), ({"test-acc": -0.5}, "test-acc"), ({"val-loss": 1e9}, "val-loss"),
    ({"val-n": 1e12}, "val-n"), ({"val-n": 3.5}, "val-n"), ({"evaluated": 2}, "evaluated"),
    ({"test-n": 41}, "histograms count"), ({"val-hist-pos": [1] * 3}, "hist-pos"),
    ({"val-hist-neg": [-1] + [0] * (HIST_BINS - 1)}, "hist-neg"),
])
def test_malformed_or_impossible_replies_are_refused_with_the_reason(changes, match):
    with pytest.raises(ValueError, match=match):
        parse_eval_reply(_tamper(**changes), num_classes=2)


def test_info_outside_the_protocol_is_refused():
    reply = eval_reply({"val": _figs(), "test": _figs()}, site="evil")
    bad = RecordDict({"metrics": reply["metrics"], "info": ConfigRecord({"site": "evil", "path": "/etc/passwd"})})
    with pytest.raises(ValueError, match="info `path`"):
        parse_eval_reply(bad, 2)


def test_an_evaluate_request_is_validated_at_the_site():
    assert EvalRequest.parse({"server-round": 3, "num-classes": 2, "backbone-sha256": "a" * 64}).num_classes == 2
    for bad in ({"server-round": -1}, {"num-classes": 1}, {"num-classes": 1e9}, {"backbone-sha256": "x"},
                {"server-round": float("nan")}, {"num-classes": True}):
        with pytest.raises(ValueError):
            EvalRequest.parse(bad)


def test_one_site_claiming_a_huge_evaluation_set_cannot_decide_the_pooled_figure():
    rows = [{"test_n": 50, "test_auc": 0.9, "test_acc": 0.8, "test_loss": 0.3} for _ in range(4)]
    rows.append({"test_n": 10_000_000, "test_auc": 0.1, "test_acc": 0.1, "test_loss": 9.0})
    capped = pooled(rows, "test", weight_cap=4.0)
    # the liar weighs at most 4 × the median n (200), not 10⁷: its 0.1 moves the figure only that far
    assert math.isclose(capped["test_auc"], (4 * 50 * 0.9 + 200 * 0.1) / 400)
    assert pooled(rows, "test", weight_cap=0)["test_auc"] < 0.2  # uncapped, it would be the pooled figure


class EvalGrid:
    """Nodes answer evaluate messages with scripted replies (content, or a Flower error)."""

    def __init__(self, replies: dict[int, object]):
        self.replies, self.sent = replies, []

    def get_node_ids(self):
        return list(self.replies)

    def push_messages(self, messages):  # Flower's Grid: push, then pull by message id
        from flwr.app import Error

        self.out = {}
        for i, m in enumerate(messages, 1):
            self.sent.append(m)
            m.metadata.__dict__["_message_id"] = str(i)  # what a real grid assigns on push
            r = self.replies[m.metadata.dst_node_id]
            if r != "silent":
                self.out[str(i)] = Message(error=Error(code=1, reason="boom"), reply_to=m) if r == "error" \
                    else Message(r, reply_to=m)
        return [str(i) for i in range(1, len(self.sent) + 1)]

    def pull_messages(self, ids):
        return [self.out.pop(i) for i in list(ids) if i in self.out]


def test_every_reply_is_recorded_or_skipped_with_its_reason_and_none_ends_the_round(task_identity):  # noqa: F811
    good = {"val": _figs(40), "test": _figs(60, 1)}
    grid = EvalGrid({1: eval_reply(good, site="a"), 2: eval_reply(good, site="b"), 3: _tamper(**{"val-auc": 5.0}),
                     4: eval_reply(None, site="d", reason="this site does not evaluate"), 5: "error", 6: "silent",
                     7: RecordDict({"metrics": MetricRecord({"evaluated": 1})})})
    strategy = SuffixFedAvg(expected=_tiny_model().expected_state())
    arrays = to_record(_tiny_model().trainable_state())
    ev = evaluate_at_sites(grid, strategy, 4, arrays, ConfigRecord({"num-classes": 2}), 0.5, 2)
    assert sorted(ev.sites) == ["a", "b"] and ev.sites["a"]["test_n"] == 60
    assert "rejected" in ev.skipped["node-3"] and "val-auc" in ev.skipped["node-3"]
    assert ev.skipped["d"] == "this site does not evaluate" and "boom" in ev.skipped["node-5"]
    assert "rejected" in ev.skipped["node-7"] and ev.timed_out == ["node-6"]
    assert all(m.content["config"]["server-round"] == 4 for m in grid.sent) and len(grid.sent) == 7
    decision = ev.choose_threshold(binary=True)
    assert decision.rule == "threshold" and "federated validation (80 images, 2 sites)" == decision.chosen_on
    ev.apply(decision)
    assert ev.sites["a"]["test_acc"] == accuracy_at(ev.raw["a"]["test"], decision.threshold)


def test_a_site_claiming_a_huge_validation_split_cannot_place_the_federations_threshold():
    """The attack: one site of five replies histograms of a million 'validation examples', every positive scored
    near 0, to move the pooled threshold (and so every site's decisions). Its histograms count
    only as much as 4 × the median site's, as in the pooled figures: its pull is bounded (here it still holds half of
    the pooled weight and moves the threshold by about a tenth), not removed."""
    from fedtl.evaluation import score_histograms

    def site(seed):
        s, y = _scores(60, 60, seed=seed)
        neg, pos = (np.asarray(h) for h in score_histograms(s, y))
        return {"val": {"hist_neg": neg, "hist_pos": pos}}

    honest = SiteEvaluation(raw={f"s{i}": site(i) for i in range(4)})
    base = honest.choose_threshold(binary=True).threshold
    hostile_pos = np.zeros(HIST_BINS, np.int64)
    hostile_pos[0] = 1_000_000
    attacked = SiteEvaluation(raw={**honest.raw, "evil": {"val": {"hist_neg": np.zeros(HIST_BINS, np.int64),
                                                                   "hist_pos": hostile_pos}}})
    t = attacked.choose_threshold(binary=True).threshold
    assert 0.3 <= base <= 0.7 and 0.2 <= t <= 0.8 and abs(t - base) <= 0.15, (base, t)
    # uncapped (weight_cap 0: every example counts, as before the cap), the same reply moves it by 0.3
    assert abs(attacked.choose_threshold(binary=True, weight_cap=0).threshold - base) >= 0.25


def test_a_site_scores_the_suffix_on_its_own_splits():
    model = _tiny_model()
    model.load_trainable_state(_head({0: 3.0}))
    x, y = _split(0, n=80)
    figs = evaluate_site(model, SiteEvalData("s", {"val": (x[:40], y[:40]), "test": (x[40:], y[40:])}))
    assert figs["val"]["n"] == 40 and figs["test"]["auc"] > 0.8
    assert sum(figs["test"]["hist_neg"]) + sum(figs["test"]["hist_pos"]) == 40
    assert sum(figs["test"]["hist_pos"]) == int(y[40:].sum())


# ---- the server: selection by the sites' figures, decision stored with the suffix -------------------

def test_without_server_data_rounds_are_selected_by_the_sites_pooled_validation(monkeypatch, tmp_path):
    """No data at the server: the pooled validation AUC of the sites picks the round, the threshold comes from
    their histograms and is stored with the suffix; the per-site table is that round's."""
    model = _tiny_model()
    x, y = _split(0, n=200, seed=4)

    def site_eval(rnd, arrays):  # two sites scoring each round's suffix on their own data
        model.load_trainable_state({k: torch.as_tensor(v.numpy()) for k, v in arrays.items()})
        ev = SiteEvaluation()
        for i, name in enumerate(("a", "b")):
            part = slice(100 * i, 100 * i + 100)
            figs = evaluate_site(model, SiteEvalData(name, {"val": (x[part][:50], y[part][:50]),
                                                            "test": (x[part][50:], y[part][50:])}))
            ev.raw[name] = {s: {**f, "hist_neg": np.array(f["hist_neg"]), "hist_pos": np.array(f["hist_pos"])}
                            for s, f in figs.items()}
            ev.sites[name] = {f"{s}_{k}": figs[s][k] for s in ("val", "test") for k in ("n", "auc", "acc", "loss")}
        return ev

    monkeypatch.setattr(server, "evaluate_at_sites", lambda grid, strategy, rnd, arrays, *a: site_eval(rnd, arrays))
    monkeypatch.setattr(server, "build_transfer_model", lambda cfg, n: _tiny_model())
    monkeypatch.setattr(tracking, "load_source", lambda path: pytest.fail("a deployed server must not load demo data"))
    script = [_head({1: 1.0}), _head({0: 2.0}), _head({0: -1.0})]  # only round 2 separates the classes
    monkeypatch.setattr(server, "_train_round", lambda *a: [])
    from fedtl.federation.strategy import BoundedSuffixAggregation

    monkeypatch.setattr(BoundedSuffixAggregation, "aggregate_train", lambda self, rnd, replies: (to_record(script[rnd - 1]), None))
    from fedtl.config import FedTLConfig

    cfg = FedTLConfig().with_overrides({"model.pooling": "avg", "federation.rounds": 3, "federation.sites": 2, "model.num-classes": 2,
                                        "output.dir": str(tmp_path / "run")})
    summary = server.run_server(object(), cfg, "t", distribute_backbone=False)  # a deployment: no demo data
    assert summary["selected_round"] == 2 and summary["evaluation"]["selected_by"] == "federated"
    assert summary["evaluation"]["server_data"].startswith("none")
    assert set(summary["per_site"]["sites"]) == {"a", "b"}
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "val_auc" not in rows[1] and rows[2]["fed_val_auc"] == max(r["fed_val_auc"] for r in rows[1:])
    assert summary["test_auc"] == rows[2]["fed_test_auc"]
    # the argmax accuracy is pooled too (a deployment trial's report showed "test accuracy at argmax –")
    sites = summary["per_site"]["sites"]
    assert math.isclose(summary["test_acc_argmax"], np.average([sites[s]["test_acc_argmax"] for s in ("a", "b")],
                                                               weights=[sites[s]["test_n"] for s in ("a", "b")]))
    with safe_open(tmp_path / "run" / "suffix.safetensors", "pt") as fh:
        stored = decision_from_metadata(fh.metadata())
    assert stored.rule == "threshold" and stored.chosen_on.startswith("federated validation")
    assert stored.to_dict() == summary["decision"]


def test_a_deployed_server_without_data_or_class_count_says_what_to_set(monkeypatch, tmp_path):
    from fedtl.config import FedTLConfig
    from fedtl.errors import ConfigError

    monkeypatch.setattr(tracking, "load_source", lambda path: pytest.fail("no demo data for a deployed server"))
    with pytest.raises(ConfigError, match="model.num-classes"):
        tracking.plan_evaluation(FedTLConfig(), demo_data=False)
    with pytest.raises(ConfigError, match="data.path"):
        tracking.plan_evaluation(FedTLConfig().with_overrides({"evaluation.central": "on"}), demo_data=False)
    plan = tracking.plan_evaluation(FedTLConfig().with_overrides({"model.num-classes": 3}), demo_data=False)
    assert (plan.source, plan.sites, plan.select_by, plan.num_classes) == (None, "every-round", "federated", 3)


def test_a_simulation_without_central_evaluation_takes_the_class_count_from_its_sites_data(tmp_path):
    """`fedtl simulate --set evaluation.central=off`: the server evaluates nothing itself, but the simulation's data
    set (the sites' partitions) has a class count; it used to stop with "set model.num-classes" after the warm-up."""
    from fedtl.config import FedTLConfig

    off = FedTLConfig().with_overrides({"evaluation.central": "off"})
    plan = tracking.plan_evaluation(off, demo_data=True)  # the bundled PneumoniaMNIST
    assert (plan.source, plan.sites, plan.select_by, plan.num_classes) == (None, "every-round", "federated", 2)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "three.npz", **{f"{s}_{k}": rng.integers(0, 255, (12, 28, 28), dtype=np.uint8) if k == "images"
                                        else np.arange(12) % 3 for s in ("train", "val", "test")
                                        for k in ("images", "labels")})
    assert tracking.plan_evaluation(off.with_overrides({"data.path": str(tmp_path / "three.npz")}),
                                    demo_data=True).num_classes == 3


def test_the_servers_evaluation_data_may_be_an_image_folder_with_a_csv(tmp_path):
    from fedtl.config import FedTLConfig
    from fedtl.errors import ConfigError
    from tests.unit.test_site_evaluation import _folder_site

    _folder_site(tmp_path, 30, "srv")
    (tmp_path / "named.csv").write_text("file,label\n" + "".join(f"{i}.png,{'ab'[i % 2]}\n" for i in range(30)))
    cfg = FedTLConfig().with_overrides({"evaluation.data-format": "folder", "evaluation.data-path": str(tmp_path / "srv"),
                                        "evaluation.data-labels": str(tmp_path / "srv.csv")})
    plan = tracking.plan_evaluation(cfg, demo_data=False)
    assert plan.num_classes == 2 and plan.data.endswith("(folder)") and plan.select_by == "central"
    assert len(plan.source.val) + len(plan.source.test) == 30
    assert all(c in (7, 8) for c in np.bincount(plan.source.val.labels).tolist())  # half of each class
    named = cfg.with_overrides({"evaluation.data-labels": str(tmp_path / "named.csv"), "evaluation.data-classes": "a,b"})
    assert tracking.plan_evaluation(named, demo_data=False).num_classes == 2
    with pytest.raises(ConfigError, match="evaluation.data-labels"):
        tracking.plan_evaluation(cfg.with_overrides({"evaluation.data-labels": ""}), demo_data=False)
    with pytest.raises(ConfigError, match="evaluation.data-format"):
        FedTLConfig().with_overrides({"evaluation.data-path": "x"})
