"""fedtl.decision: the one reader / writer of a run's decision rule (`fedtl.decision` metadata)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import safe_open, save_file

from fedtl.decision import METADATA_KEY, Decision, decision_from_metadata
from fedtl.errors import ConfigError

PROBS = np.array([[0.70, 0.30], [0.55, 0.45], [0.40, 0.60], [0.58, 0.42]], np.float32)


def test_absent_rule_is_argmax():
    for meta in (None, {}, {"backbone": "efficientnet_lite0", "round": "3"}):
        d = decision_from_metadata(meta)
        assert d.rule == "argmax"
        assert d.apply(PROBS).tolist() == [0, 0, 1, 0]


def test_threshold_rule_moves_the_cut_and_ties_go_to_the_positive_class():
    d = decision_from_metadata({METADATA_KEY: '{"rule": "threshold", "positive-class": 1, "threshold": 0.42}'})
    assert (d.rule, d.positive_class, d.threshold) == ("threshold", 1, 0.42)
    assert d.apply(PROBS).tolist() == [0, 1, 1, 1]  # 0.42 >= 0.42: positive
    flipped = Decision("threshold", positive_class=0, threshold=0.6)
    assert flipped.apply(PROBS).tolist() == [0, 1, 1, 1]  # P(class 0) >= 0.6 only in row 0
    assert d.apply(PROBS).dtype == np.int64


def test_argmax_works_for_many_classes_and_threshold_refuses_them():
    probs = np.array([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])
    assert Decision().apply(probs).tolist() == [2, 0]
    with pytest.raises(ConfigError, match="binary model; this one has 3 classes"):
        Decision("threshold", 0.3, 1).apply(probs)


def test_the_servers_calibrated_rule_with_what_it_was_chosen_on_is_read():
    """As the ServerApp stores it: the threshold chosen on validation, and where."""
    meta = {METADATA_KEY: '{"chosen-on": "central validation (524 images)", "positive-class": 1, "rule": "threshold", '
                          '"threshold": 0.7321}', "num_classes": "2"}
    d = decision_from_metadata(meta)
    assert (d.rule, d.threshold, d.positive_class, d.chosen_on) == ("threshold", 0.7321, 1, "central validation (524 images)")
    assert d.describe() == "class 1 iff P(class 1) >= 0.7321 (chosen on central validation (524 images))"
    assert decision_from_metadata(d.to_metadata()) == d


def test_round_trip_through_safetensors_metadata(tmp_path):
    rule = Decision("threshold", positive_class=1, threshold=0.42)
    path = tmp_path / "suffix.safetensors"
    save_file({"w": torch.zeros(2)}, path, metadata={"round": "2", **rule.to_metadata()})
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta[METADATA_KEY]) == {"rule": "threshold", "positive-class": 1, "threshold": 0.42}
    assert decision_from_metadata(meta) == rule
    assert decision_from_metadata(Decision().to_metadata()) == Decision()


@pytest.mark.parametrize("text, message", [
    ("not json", "must be a JSON object, got 'not json'"),
    ("[1, 2]", "must be a JSON object"),
    ('{"rule": "median"}', "`rule` must be one of argmax, threshold, bias, got 'median'"),
    ('{"rule": "bias"}', "needs a `bias` list"),
    ('{"rule": "bias", "bias": [0.1]}', "at least 2 numbers"),
    ('{"rule": "bias", "bias": [0, "1"]}', "list of at least 2 numbers"),
    ('{"rule": "bias", "bias": [0, 1e9]}', "list of at least 2 numbers"),
    ('{"rule": "bias", "bias": {"a": 1}}', "list of at least 2 numbers"),
    ('{"rule": "bias", "bias": [0, 1], "threshold": 0.3}', "unknown key"),
    ('{"rule": "threshold"}', "needs a `threshold`"),
    ('{"rule": "threshold", "threshold": 1.5}', r"`threshold` must be a number in \[0, 1\], got 1.5"),
    ('{"rule": "threshold", "threshold": "0.4"}', "`threshold` must be a number"),
    ('{"rule": "threshold", "threshold": 0.4, "positive-class": 2}', r"`positive-class` must be 0 or 1 .*got 2"),
    ('{"rule": "argmax", "threshold": 0.4}', "unknown key"),
])
def test_malformed_rules_are_refused_with_the_value(text, message):
    with pytest.raises(ConfigError, match=message):
        decision_from_metadata({METADATA_KEY: text})


def test_bias_rule_shifts_the_argmax_and_round_trips():
    probs = np.array([[0.5, 0.3, 0.2], [0.4, 0.35, 0.25], [0.2, 0.2, 0.6]], np.float32)
    rule = Decision("bias", chosen_on="central validation (120 images)", bias=(0.0, 0.5, -2.0))
    # log(0.35) + 0.5 > log(0.4); log(0.6) - 2 < log(0.2) + 0.5
    assert rule.apply(probs).tolist() == [0, 1, 1]
    assert Decision().apply(probs).tolist() == [0, 0, 2]
    meta = rule.to_metadata()
    assert json.loads(meta[METADATA_KEY])["bias"] == [0.0, 0.5, -2.0]
    assert decision_from_metadata(meta) == rule
    with pytest.raises(ConfigError, match="3 offsets; this model has 2 classes"):
        rule.check_classes(2)


def test_bias_search_beats_the_argmax_on_validation_or_keeps_it():
    from fedtl.evaluation import bias_from_probabilities

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3))
    logits[np.arange(300), y] += 1.0
    logits[:, 0] += 1.5  # a model that over-predicts class 0 (trained on another class mix)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    bias = bias_from_probabilities(probs, y)
    assert bias is not None and bias[0] == 0.0
    fixed = Decision("bias", bias=tuple(bias))
    assert np.mean(fixed.apply(probs) == y) > np.mean(probs.argmax(1) == y) + 0.05
    assert bias_from_probabilities(probs[:10], y[:10]) is None  # too few examples to move the argmax
    calibrated = np.eye(3)[y] * 0.9 + 0.05  # already right everywhere: nothing to gain
    assert bias_from_probabilities(calibrated, y) is None


def test_central_decision_is_chosen_on_validation_by_class_count_and_mode():
    from fedtl.evaluation import central_decision

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    p1 = np.clip(0.75 + 0.1 * rng.standard_normal(80) + 0.1 * y, 0, 1)  # every score above 0.5: argmax says 1
    probs = np.stack([1 - p1, p1], 1)
    d = central_decision(probs, y)
    assert d.rule == "threshold" and 0.5 < d.threshold < 1 and "80 images" in d.chosen_on
    assert np.mean(d.apply(probs) == y) > np.mean(probs.argmax(1) == y)
    assert central_decision(probs, y, mode="argmax").rule == "argmax"
    assert central_decision(np.empty((0, 2)), np.empty(0, int)).rule == "argmax"
    assert central_decision(probs, np.zeros(80, int)).rule == "argmax"  # one class: no threshold
    k3 = np.tile([[0.5, 0.3, 0.2]], (9, 1))  # 9 < 5 × 3 examples: too few to move the argmax
    assert central_decision(k3, np.arange(9) % 3).rule == "argmax"


def test_the_bootstrap_auc_gain_bound_is_paired_stratified_and_honest():
    from fedtl.evaluation import _bootstrap_aucs, auc_gain_bound, auc_of

    rng = np.random.default_rng(0)

    def probs(s):
        p = 1 / (1 + np.exp(-s))
        return np.stack([1 - p, p], axis=1)

    y = rng.integers(0, 2, 105)
    s = y + rng.normal(0, 1, 105)
    # the vectorized AUC is auc_of's, binary and multi-class (ties included: a resample repeats examples)
    rows = np.sort(rng.integers(0, 105, (1, 105)), axis=1)
    rows = rows[:, np.argsort(y[rows[0]], kind="stable")]
    assert _bootstrap_aucs(probs(s), y, rows)[0] == pytest.approx(auc_of(probs(s)[rows[0]], y[rows[0]]))
    y5 = rng.integers(0, 5, 200)
    p5 = rng.dirichlet(np.ones(5), 200)
    p5[np.arange(200), y5] += 0.3
    p5 /= p5.sum(1, keepdims=True)
    r5 = rng.integers(0, 200, 200)
    r5 = r5[np.argsort(y5[r5], kind="stable")]
    assert _bootstrap_aucs(p5, y5, r5[None])[0] == pytest.approx(auc_of(p5[r5], y5[r5]))
    # identical models: no gain, and no evidence of one
    assert auc_gain_bound(probs(s), probs(s), y) == 0.0
    # a tiny point gain on ~100 images is not evidence; a large one is, and the bound sits below the point gain
    tiny = s + rng.normal(0, 0.05, 105)
    assert auc_gain_bound(probs(s), probs(tiny), y) < 0
    better = 3 * y + rng.normal(0, 1, 105)
    point = auc_of(probs(better), y) - auc_of(probs(s), y)
    bound = auc_gain_bound(probs(s), probs(better), y)
    assert 0 < bound < point
    assert bound == auc_gain_bound(probs(s), probs(better), y)  # reproducible: a fixed resampling seed
    # one class: AUC undefined, no bound; bad arguments are refused
    assert np.isnan(auc_gain_bound(probs(s[y == 1]), probs(better[y == 1]), y[y == 1]))
    # a class of 4 examples cannot be resampled into doubt (one example: the same in every resample): no bound
    keep = np.concatenate([np.flatnonzero(y == 0)[:4], np.flatnonzero(y == 1)])
    assert np.isnan(auc_gain_bound(probs(s[keep]), probs(better[keep]), y[keep]))
    assert np.isfinite(auc_gain_bound(probs(s[keep]), probs(better[keep]), y[keep], min_per_class=4))  # 4 are enough there
    with pytest.raises(ValueError, match="confidence"):
        auc_gain_bound(probs(s), probs(better), y, confidence=1.0)
