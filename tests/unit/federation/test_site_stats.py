"""Standardizing statistics from the sites' evaluation images, for a server without validation data.

Every reply is untrusted input: statistics of too few images, of another width, out of range or from a liar are
refused or out-voted; a site's policy (no [evaluation], release-scores = false) sends none; a run trains with the
sites' median and a resumed run with the same statistics, never asking again.
"""

import json
import math

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedtl.config import AdaptersConfig, FedTLConfig, ModelConfig
from fedtl.federation import server
from fedtl.federation.records import to_record
from fedtl.federation.site import SiteEvalData
from fedtl.federation.site_stats import (MIN_STAT_IMAGES, STATS_FILE, FeatureStandardizer, SiteStatistics,
                                         parse_stats_reply, pooled_statistics, site_statistics, statistics_from_sites,
                                         stats_reply)
from fedtl.model import TransferModel
from fedtl.standardize import server_standardizer
from tests.conftest import make_tiny_backbone
from tests.unit.federation.test_fedeval import EvalGrid
from tests.unit.federation.test_server import task_identity  # noqa: F401  (a fixture)


def _model(pooling="avg", classes=2):
    return TransferModel(make_tiny_backbone(), classes, ModelConfig(pooling=pooling), AdaptersConfig(kind="none", blocks=0))


def _data(n_val=15, n_test=15, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_val + n_test, 16, generator=g) * 2.0 + 5.0 + shift
    y = torch.arange(n_val + n_test) % 2
    return SiteEvalData("s", {"val": (x[:n_val], y[:n_val]), "test": (x[n_val:], y[n_val:])})


def test_a_site_sends_the_statistics_of_all_its_evaluation_images_and_the_server_reads_them_back(caplog):
    cfg = FedTLConfig()
    model, data = _model(), _data()
    with caplog.at_level("INFO", logger="fedtl.federation.site_stats"):
        reply = site_statistics(cfg, model, data, site="st-anne")
    # what left the site is in its own log
    assert "Site st-anne sends the server the feature statistics of its 30 evaluation images" in caplog.text
    site, stats, _ = parse_stats_reply(reply, dim=16)
    assert site == "st-anne" and reply["metrics"]["n"] == 30
    expected = server_standardizer(cfg, torch.cat([data.splits["val"][0], data.splits["test"][0]]), model)
    assert torch.allclose(stats.mean, expected.mean) and torch.allclose(stats.scale, expected.scale)
    # the site's policy and its size: nothing sent, and why
    for reply, why in ((site_statistics(cfg, model, data, site="x", release=False), "release-statistics = false"),
                       (site_statistics(cfg, model, _data(8, 8), site="y"), f"fewer than {MIN_STAT_IMAGES}")):
        assert reply["metrics"]["n"] == 0 and reply["metrics"]["feature-mean"] == []
        assert parse_stats_reply(reply, 16)[1] is None and why in parse_stats_reply(reply, 16)[2]


def _tamper(**changes):
    reply = site_statistics(FedTLConfig(), _model(), _data(), site="evil")
    values = dict(reply["metrics"])
    values.update(changes)
    return RecordDict({"metrics": MetricRecord(values), "info": reply["info"]})


@pytest.mark.parametrize("changes,match", [
    ({"n": 5}, "at least 20"),  # statistics of a handful of images are not accepted
    ({"n": 0}, "sent with n = 0"),
    ({"n": 2.5}, "`n`"),
    ({"feature-mean": [0.0] * 15}, "has 15 values"),
    ({"feature-mean": [0.0] * 17, "feature-scale": [1.0] * 17}, "head takes 16"),
    ({"feature-scale": [0.0] * 16}, "feature-scale"),  # a zero scale would blow the head up at the sites
    ({"feature-scale": [1e9] * 16}, "feature-scale"),
    ({"feature-mean": [1e9] * 16}, "feature-mean"),
    ({"extra": 1.0}, "unexpected"),
])
def test_malformed_statistics_are_refused_with_the_reason(changes, match):
    with pytest.raises(ValueError, match=match):
        parse_stats_reply(_tamper(**changes), dim=16)


def test_one_site_lying_about_its_statistics_cannot_set_the_federations():
    """The attack: one site of five sends means of 10⁵ and scales of 10⁵ (inside the ranges a site accepts), which
    would shrink every site's standardized features to nothing. The coordinate-wise median of five keeps the
    honest sites' range."""
    honest = [server_standardizer(FedTLConfig(), _data(seed=i).splits["val"][0], _model()) for i in range(4)]
    liar = FeatureStandardizer(torch.full((16,), 1e5, dtype=torch.float64), torch.full((16,), 1e5, dtype=torch.float64))
    pooled = pooled_statistics(honest + [liar])
    lo = torch.stack([h.mean for h in honest]).min(0).values
    hi = torch.stack([h.mean for h in honest]).max(0).values
    assert bool(((pooled.mean >= lo) & (pooled.mean <= hi)).all())
    assert float(pooled.scale.max()) <= float(torch.stack([h.scale for h in honest]).max())
    assert float(torch.stack([h.mean for h in honest + [liar]]).mean(0).min()) > 1e4  # a mean would be the liar's


def test_the_server_asks_every_site_and_pools_only_the_statistics_that_pass(task_identity):  # noqa: F811
    from fedtl.federation.strategy import SuffixFedAvg

    cfg, model = FedTLConfig(), _model()
    good = [site_statistics(cfg, model, _data(seed=i), site=f"s{i}") for i in range(3)]
    grid = EvalGrid({1: good[0], 2: good[1], 3: good[2], 4: _tamper(n=3),
                     5: stats_reply(None, site="quiet", reason="this site does not evaluate"), 6: "silent"})
    strategy = SuffixFedAvg(expected=model.expected_state())
    stats, result = statistics_from_sites(grid, strategy, to_record(model.trainable_state()),
                                          ConfigRecord({"num-classes": 2}), 16, timeout=0.5)
    assert sorted(result.sites) == ["s0", "s1", "s2"] and "at least 20" in result.skipped["node-4"]
    assert result.skipped["quiet"] == "this site does not evaluate" and result.timed_out == ["node-6"]
    assert all(m.content["config"]["feature-statistics"] == 1 for m in grid.sent)
    assert torch.allclose(stats.mean, pooled_statistics(list(result.sites.values())).mean)
    nobody = EvalGrid({1: stats_reply(None, site="q", reason="no")})
    assert statistics_from_sites(nobody, strategy, to_record(model.trainable_state()), ConfigRecord({}), 16, 0.5)[0] is None


def _run(monkeypatch, tmp_path, stats, rounds=2, fail_at=None, **extra):
    """run_server without server data (model.pooling = auto) on the tiny backbone; the sites' statistics scripted."""
    from fedtl.federation import tracking
    from fedtl.federation.fedeval import SiteEvaluation
    from fedtl.federation.strategy import BoundedSuffixAggregation

    sent = {"builds": 0}

    def build(cfg, n):
        sent["builds"] += 1
        return TransferModel(make_tiny_backbone(), n, cfg.model, cfg.adapters)

    monkeypatch.setattr(server, "build_transfer_model", build)
    monkeypatch.setattr(server, "statistics_from_sites", lambda grid, strategy, arrays, config, dim, timeout:
                        (stats(dim) if stats else None, SiteStatistics()))
    monkeypatch.setattr(server, "evaluate_at_sites", lambda *a: SiteEvaluation())
    monkeypatch.setattr(tracking, "load_source", lambda path: pytest.fail("no demo data for a deployed server"))

    def train_round(grid, strategy, rnd, arrays, train_config, fed, out):
        sent[rnd] = dict(train_config)
        if rnd == fail_at:
            raise RuntimeError("the server was killed")
        return []

    monkeypatch.setattr(server, "_train_round", train_round)
    monkeypatch.setattr(BoundedSuffixAggregation, "aggregate_train", lambda self, rnd, replies: (None, None))
    cfg = FedTLConfig().with_overrides({"federation.rounds": rounds, "federation.sites": 2, "model.num-classes": 2,
                                        "output.dir": str(tmp_path / "run"), "evaluation.select-by": "auto", **extra})
    try:
        server.run_server(object(), cfg, "t", distribute_backbone=False)
    except (RuntimeError, Exception) as exc:  # noqa: BLE001 — the scripted kill, or no round produced a model
        sent["error"] = exc
    return sent


def _stats(dim):
    return FeatureStandardizer(torch.linspace(0.5, 1.5, dim, dtype=torch.float64), torch.full((dim,), 0.7, dtype=torch.float64))


def test_a_server_without_data_trains_the_richer_pooling_on_the_sites_statistics_and_resumes_with_them(monkeypatch,
                                                                                                     tmp_path):
    sent = _run(monkeypatch, tmp_path, _stats, rounds=3, fail_at=2)
    assert sent["builds"] == 1  # the model the statistics were asked for is the one trained, not built again
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["model.pooling"] == "avg-std-grid"  # standardized, so the richer pooling
    saved = json.loads((run / STATS_FILE).read_text())
    dim = len(saved["feature-mean"])
    assert sent[1]["feature-mean"] == saved["feature-mean"] == _stats(dim).to_config()["feature-mean"]
    assert math.isclose(sent[1]["feature-scale"][0], 0.7)
    # resumed after the kill: the same pooling and statistics from the run directory, the sites not asked again
    monkeypatch.setattr(server, "statistics_from_sites", lambda *a: pytest.fail("a resumed run must not ask again"))
    cfg = FedTLConfig().with_overrides({"federation.rounds": 3, "federation.sites": 2, "model.num-classes": 2,
                                        "output.dir": str(run), "output.resume": True})
    resumed = {}
    monkeypatch.setattr(server, "_train_round", lambda grid, strategy, rnd, arrays, tc, fed, out:
                        resumed.setdefault(rnd, dict(tc)) and [])
    good = (run / STATS_FILE).read_text()
    (run / STATS_FILE).write_text("{broken")
    from fedtl.errors import ConfigError

    with pytest.raises(ConfigError, match="damaged"):  # never a silent fall-back to other statistics
        server.run_server(object(), cfg, "t", distribute_backbone=False)
    (run / STATS_FILE).write_text(good)
    server.run_server(object(), cfg, "t", distribute_backbone=False)
    assert sorted(resumed) == [2, 3] and resumed[2]["feature-mean"] == saved["feature-mean"]
    assert json.loads((run / "config.json").read_text())["model.pooling"] == "avg-std-grid"


def test_a_crash_while_saving_the_statistics_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    from fedtl.federation import site_stats

    site_stats.save_statistics(tmp_path, _stats(8))
    before = (tmp_path / STATS_FILE).read_bytes()

    def crash(*a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr("fedtl.files.os.replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        site_stats.save_statistics(tmp_path, _stats(4))
    assert (tmp_path / STATS_FILE).read_bytes() == before  # never a part of the new file
    assert [p.name for p in tmp_path.iterdir()] == [STATS_FILE]  # no temporary file left behind
    assert site_stats.load_statistics(tmp_path).mean.numel() == 8


def test_without_any_sites_statistics_the_server_trains_the_mean_pooling_and_says_why(monkeypatch, tmp_path, caplog):
    with caplog.at_level("INFO", logger="fedtl.federation.server"):
        sent = _run(monkeypatch, tmp_path, None)
    assert sent["builds"] == 2  # asked with the richer pooling, then the mean pooling built for training
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model.pooling"] == "avg"
    assert not (tmp_path / "run" / STATS_FILE).exists() and "feature-mean" not in sent[1]
    assert "no site sent the statistics of its evaluation images" in caplog.text


@pytest.mark.parametrize("policy, release", [("", True), ("release-scores = false\n", False),
                                             ("release-statistics = false\n", False),
                                             ("release-scores = false\nrelease-statistics = true\n", True)])
def test_a_deployed_site_answers_a_statistics_request_as_its_site_toml_says(tmp_path, monkeypatch, policy, release):
    """release-statistics decides; omitted, it follows release-scores (a site that withholds its scores withholds
    its statistics unless it says otherwise)."""
    from fedtl.federation import deployment
    from fedtl.federation.handlers import handle_evaluate
    from tests.unit.test_site_config import MINIMAL, write

    toml = MINIMAL + "[evaluation]\nholdout = 0.2\n" + policy
    path = str(write(tmp_path, toml))
    deployment.load_site_config.cache_clear()
    model, data = _model(), _data()
    built = []
    monkeypatch.setattr(deployment, "cached_eval_site", lambda cfg, site_config, k: built.append(1) or (model, data))
    request = RecordDict({"arrays": to_record(model.trainable_state()),
                          "config": ConfigRecord({"server-round": 0, "num-classes": 2, "feature-statistics": 1})})
    reply = handle_evaluate(request, {}, {"site-config": path}, 7, cfg=FedTLConfig().with_overrides({"model.pooling": "avg"}))
    site, stats, reason = parse_stats_reply(reply, 16)
    if release:
        assert stats is not None and reply["metrics"]["n"] == 30
    else:  # refused before any model or image is touched
        assert stats is None and "release-statistics = false" in reason and not built
    deployment.load_site_config.cache_clear()
    path = str(write(tmp_path, MINIMAL + "[evaluation]\nenabled = false\n"))
    reply = handle_evaluate(request, {}, {"site-config": path}, 7, cfg=FedTLConfig())
    assert parse_stats_reply(reply, 16)[1] is None and "does not evaluate" in reply["info"]["reason"]
