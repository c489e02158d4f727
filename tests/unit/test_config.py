import tomllib
from pathlib import Path

import pytest

from fedtl.config import FedTLConfig
from fedtl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_unknown_key_suggests_the_close_match():
    with pytest.raises(ConfigError, match=r"Unknown config key `privacy.target-epsilom`; did you mean `privacy.target-epsilon`"):
        FedTLConfig.from_run_config({"privacy.target-epsilom": 3.0})


@pytest.mark.parametrize("key,value,fragment", [
    ("privacy.target-epsilon", -1, "`privacy.target-epsilon` must be > 0, got -1.0"),
    ("privacy.delta", 2.0, "`privacy.delta` must be in (0, 1)"),
    ("federation.sites", 0, "`federation.sites` must be >= 1, got 0"),
    ("adapters.kind", "qlora", "`adapters.kind` must be one of none, lora, unfreeze, got 'qlora'"),
    ("data.partitioner", "random", "`data.partitioner` must be one of"),
    ("model.resolution", 8, "`model.resolution` must be between 32 and 1024"),
    ("privacy.site-epsilons", "3,abc", "`privacy.site-epsilons` must be a comma-separated list"),
    ("train.views", -1, "`train.views` must be between 0 (auto) and 8, got -1"),
    ("train.views", 9, "`train.views` must be between 0 (auto) and 8, got 9"),
])
def test_out_of_range_values_name_key_and_value(key, value, fragment):
    with pytest.raises(ConfigError) as err:
        FedTLConfig.from_run_config({key: value})
    assert fragment in str(err.value)


def test_views_need_the_head_only_suffix():
    assert FedTLConfig().train_views == 4  # auto: augmentation multiplicity on the cached head-only features
    assert FedTLConfig.from_run_config({"adapters.kind": "lora", "adapters.blocks": 1}).train_views == 1
    assert FedTLConfig.from_run_config({"train.views": 1}).train_views == 1
    with pytest.raises(ConfigError, match="`train.views` needs the head-only suffix"):
        FedTLConfig.from_run_config({"train.views": 4, "adapters.kind": "lora", "adapters.blocks": 1})


def test_values_from_text_are_coerced_and_validated():
    cfg = FedTLConfig.from_run_config({"federation.sites": "4", "privacy.enabled": "false", "train.lr": "0.5"})
    assert cfg.federation.sites == 4 and cfg.privacy.enabled is False and cfg.train.lr == 0.5
    with pytest.raises(ConfigError, match="`federation.rounds` must be an integer, got 'ten'"):
        FedTLConfig.from_run_config({"federation.rounds": "ten"})


def test_round_trip_through_flat_keys():
    cfg = FedTLConfig.from_run_config({"privacy.target-epsilon": 1.5, "adapters.rank": 8})
    assert FedTLConfig.from_run_config(cfg.to_run_config()) == cfg


def test_pyproject_flower_config_mirrors_the_defaults():
    nested = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    flat = {f"{section}.{key}": value for section, table in nested.items() for key, value in table.items()}
    assert flat == FedTLConfig().to_run_config()


def test_site_budgets():
    cfg = FedTLConfig.from_run_config({"privacy.site-epsilons": "3, 1.5", "privacy.target-epsilon": 2.0})
    assert [cfg.privacy.budget_for(i) for i in range(3)] == [3.0, 1.5, 2.0]


def test_auto_pooling_is_the_richer_one_only_where_the_head_trains_standardized():
    cfg = FedTLConfig()
    assert cfg.model.pooling == "auto"
    assert cfg.resolved(has_reference=True).model.pooling == "avg-std-grid"
    assert cfg.resolved(has_reference=False).model.pooling == "avg"  # no server statistics: the spatial mean
    for overrides in ({"train.standardize": "none"}, {"model.feature-norm": "layernorm"}):
        assert cfg.with_overrides(overrides).resolved(has_reference=True).model.pooling == "avg", overrides
    lora = cfg.with_overrides({"adapters.kind": "lora", "adapters.blocks": 1})  # its head trains standardized too
    assert lora.resolved(has_reference=True).model.pooling == "avg-std-grid"
    assert lora.resolved(has_reference=False).model.pooling == "avg"
    explicit = cfg.with_overrides({"model.pooling": "avg-std", "model.head": "mlp"})
    assert explicit.resolved(True) is explicit and explicit.resolved(False, graded=True) is explicit
    # what the server will hold: its data (or fedtl simulate's bundled data), unless central evaluation is off
    assert not cfg.has_reference() and cfg.has_reference(demo_data=True)
    assert cfg.simulated().model.pooling == "avg-std-grid"  # fedtl simulate's bundled data is validation data
    assert cfg.with_overrides({"evaluation.central": "off"}).simulated().model.pooling == "avg"
    assert cfg.with_overrides({"data.path": "x.npz"}).has_reference()
    assert cfg.with_overrides({"evaluation.data-format": "folder", "evaluation.data-path": "imgs"}).has_reference()
    assert not cfg.with_overrides({"data.path": "x.npz", "evaluation.central": "off"}).has_reference()


def test_auto_head_is_ordinal_only_for_graded_labels(tmp_path):
    cfg = FedTLConfig()
    assert cfg.model.head == "auto" and cfg.data.labels == "auto"
    assert cfg.resolved(True).model.head == "linear" and cfg.resolved(True, graded=True).model.head == "ordinal"
    assert cfg.simulated().model.head == "linear"  # the bundled PneumoniaMNIST: binary, unordered
    retina = cfg.with_overrides({"data.path": "/data/retinamnist.npz"})
    assert retina.graded_labels() and retina.simulated().model.head == "ordinal"  # MedMNIST: ordinal-regression
    for name in ("retinamnist_224.npz", "RetinaMNIST.npz", "retinamnist_64.npz"):
        assert cfg.graded_labels(tmp_path / name, 5), name
    # a file that only borrows the name (another class count), or another name, makes no claim
    assert not cfg.graded_labels(tmp_path / "retinamnist.npz", 2)
    for name in ("retina.npz", "my_retinamnist.npz", "retinamnist_100.npz", "pathmnist.npz", "retinamnist.npz.bak"):
        assert not cfg.graded_labels(tmp_path / name, 5), name
    # the user's declaration wins either way (image folders declare nothing)
    assert cfg.with_overrides({"data.labels": "graded"}).simulated().model.head == "ordinal"
    assert retina.with_overrides({"data.labels": "unordered"}).simulated().model.head == "linear"
    assert retina.with_overrides({"model.head": "linear"}).simulated().model.head == "linear"  # an explicit head stays
    with pytest.raises(ConfigError, match="data.labels"):
        cfg.with_overrides({"data.labels": "ordered"})


def test_aggregation_weights_are_one_per_site_or_capped_counts():
    from fedtl.config import FederationConfig
    from fedtl.weighting import aggregation_weights

    reported = [10.0, 20.0, 30.0, 1000.0]
    assert FederationConfig().aggregation_weights(reported) == [10.0, 20.0, 25.0, 25.0]  # the default: ≤ the median
    assert aggregation_weights(reported, "sites", 1.0) == [1.0] * 4
    assert aggregation_weights(reported, "examples", 4.0) == [10.0, 20.0, 30.0, 100.0]  # 4 × median 25
    assert aggregation_weights(reported, "examples", 0.0) == reported  # no cap
    assert aggregation_weights([], "sites", 4.0) == []
    with pytest.raises(ValueError, match="weighting"):
        aggregation_weights(reported, "median", 4.0)
    with pytest.raises(ConfigError, match="federation.weighting"):
        FedTLConfig.from_run_config({"federation.weighting": "site"})


def test_test_time_views_follow_the_training_views_unless_set():
    assert FedTLConfig().eval_views == 4 == FedTLConfig().train_views  # head-only: 4 views, tested as trained
    assert FedTLConfig().with_overrides({"train.views": 2}).eval_views == 2
    assert FedTLConfig().with_overrides({"evaluation.views": 1}).eval_views == 1
    assert FedTLConfig().with_overrides({"adapters.kind": "lora", "adapters.blocks": 1}).eval_views == 1
    with pytest.raises(ConfigError, match="evaluation.views"):
        FedTLConfig().with_overrides({"evaluation.views": 9})
    with pytest.raises(ConfigError, match="evaluation.views.*head-only"):
        FedTLConfig().with_overrides({"adapters.kind": "lora", "adapters.blocks": 1, "evaluation.views": 4})
