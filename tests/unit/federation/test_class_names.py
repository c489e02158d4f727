"""The run's class names (``model.class-names``) against a site's own ``data.classes``: a site whose classes are the
run's in another order would teach the federation swapped labels, so it refuses before anything is planned or spent;
what the server names is untrusted input like the rest of its request."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import tomli_w
from flwr.app import ConfigRecord, RecordDict

from fedtl.errors import ConfigError
from tests.unit.federation.test_first_round import _ledger_rounds as _rounds
from tests.unit.federation.test_worker import _warm_site


def _with_classes(site: Path, classes: list[str]) -> None:
    import tomllib

    from fedtl.federation import deployment

    conf = tomllib.loads(site.read_text())
    conf["data"]["classes"] = classes
    site.write_text(tomli_w.dumps(conf))
    deployment.load_site_config.cache_clear()


def _train(site: Path, content: RecordDict, **config) -> tuple[dict, RecordDict]:
    from fedtl.federation.handlers import handle_train

    sent = RecordDict({"config": ConfigRecord({**dict(content["config"]), **config}), "arrays": content["arrays"]})
    reply = handle_train(sent, {}, {"site-config": str(site)}, 1, received_at=time.monotonic())
    return dict(reply["metrics"]), reply


@pytest.mark.slow
def test_a_site_whose_classes_are_the_runs_in_another_order_refuses_and_spends_nothing(tmp_path, monkeypatch):
    site, content = _warm_site(tmp_path, monkeypatch)
    _with_classes(site, ["pneumonia", "normal"])
    metrics, reply = _train(site, content, **{"class-names": "normal,pneumonia"})
    reason = str(reply["info"]["reason"])
    assert metrics["declined"] == 1 and "in another order" in reason and "swapped" in reason, reason
    assert reply["info"]["site"] == "st-mary"  # the server names the refusing site, not its node id
    _with_classes(site, ["normal", "effusion"])
    metrics, reply = _train(site, content, **{"class-names": "normal,pneumonia"})
    assert metrics["declined"] == 1 and "are not the run's ['normal', 'pneumonia']" in str(reply["info"]["reason"])
    # hostile or malformed names: refused as an invalid request, naming the key
    for bad in ("normal", "a,a", "x," + "y" * 65, "a,b,c", "a,\x1b[2Jb", 7):
        metrics, reply = _train(site, content, **{"class-names": bad})
        assert metrics["declined"] == 1 and "`class-names`" in str(reply["info"]["reason"]), bad
    assert _rounds(tmp_path) == []  # nothing planned or spent by any refusal
    # the same names (case and blanks aside): trained
    _with_classes(site, [" Normal", "PNEUMONIA "])
    metrics, reply = _train(site, content, **{"class-names": "normal,pneumonia"})
    assert metrics["declined"] == 0, reply["info"]["reason"]
    assert _rounds(tmp_path) == [1]


def test_class_names_are_validated_where_they_are_set():
    from fedtl.config import FedTLConfig

    cfg = FedTLConfig().with_overrides({"model.class-names": " normal , pneumonia "})
    assert cfg.model.class_names == "normal,pneumonia"
    for bad in ("normal", "a,,b", "a,a", "a," + "b" * 65):
        with pytest.raises(ConfigError, match="model.class-names"):
            FedTLConfig().with_overrides({"model.class-names": bad})
    with pytest.raises(ConfigError, match="names 2 classes but model.num-classes is 3"):
        FedTLConfig().with_overrides({"model.class-names": "a,b", "model.num-classes": 3})


def test_a_class_name_count_that_is_not_the_tasks_is_refused_before_the_run(tmp_path):
    from fedtl.config import FedTLConfig
    from fedtl.federation.tracking import plan_evaluation
    from tests.conftest import write_small_medmnist

    data = tmp_path / "d.npz"
    write_small_medmnist(data, n_train=8, n_val=4, n_test=4)
    plan = plan_evaluation(FedTLConfig().with_overrides({"data.path": str(data), "model.class-names": "a,b"}), False)
    assert plan.num_classes == 2
    with pytest.raises(ConfigError, match="names 3 classes"):
        plan_evaluation(FedTLConfig().with_overrides({"data.path": str(data), "model.class-names": "a,b,c"}), False)
