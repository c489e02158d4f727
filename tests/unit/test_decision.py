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
    ('{"rule": "median"}', "`rule` must be one of argmax, threshold, got 'median'"),
    ('{"rule": "threshold"}', "needs a `threshold`"),
    ('{"rule": "threshold", "threshold": 1.5}', r"`threshold` must be a number in \[0, 1\], got 1.5"),
    ('{"rule": "threshold", "threshold": "0.4"}', "`threshold` must be a number"),
    ('{"rule": "threshold", "threshold": 0.4, "positive-class": 2}', r"`positive-class` must be 0 or 1 .*got 2"),
    ('{"rule": "argmax", "threshold": 0.4}', "unknown key"),
])
def test_malformed_rules_are_refused_with_the_value(text, message):
    with pytest.raises(ConfigError, match=message):
        decision_from_metadata({METADATA_KEY: text})
