"""A site's `[evaluation]`: its own labelled set or a stored hold-out; held-out images never reach training."""

import json

import numpy as np
import pytest
from PIL import Image

from fedtl.errors import ConfigError
from fedtl.federation import deployment, site_split
from fedtl.site_config import SiteConfig
from tests.unit.test_site_config import MINIMAL, write


def test_no_evaluation_table_means_the_site_does_not_evaluate(tmp_path):
    site = SiteConfig.load(write(tmp_path, MINIMAL))
    assert not site.evaluation.enabled and site.evaluation.data is None


def test_an_own_evaluation_set_takes_the_keys_of_data_and_resolves_its_paths(tmp_path):
    text = MINIMAL.replace('format = "medmnist"\npath = "m.npz"\n', 'format = "folder"\npath = "imgs"\nlabels = "l.csv"\n'
                                                                       'classes = ["a", "b"]\n')
    text += '[evaluation]\nformat = "folder"\npath = "test-imgs"\nlabels = "test.csv"\nvalidation-fraction = 0.3\n'
    site = SiteConfig.load(write(tmp_path, text))
    ev = site.evaluation
    assert ev.enabled and ev.data.path == tmp_path / "test-imgs" and ev.data.labels == tmp_path / "test.csv"
    assert ev.data.classes == ("a", "b") and ev.validation_fraction == 0.3 and ev.holdout == 0
    assert ("evaluation.labels", tmp_path / "test.csv") in site.configured_paths()


@pytest.mark.parametrize("table,message", [
    ("validation-fraction = 0.5\n", "either its own data"),
    ('holdout = 0.2\nformat = "medmnist"\npath = "t.npz"\n', "not both"),
    ("holdout = 0.9\n", "evaluation.holdout"),
    ("holdout = nan\n", "evaluation.holdout"),
    ("holdout = 0.2\nvalidation-fraction = 2\n", "evaluation.validation-fraction"),
    ('format = "folder"\npath = "t"\n', "evaluation.labels"),
    ('path = "t.npz"\n', "evaluation.format"),
    ('enabled = "yes"\nholdout = 0.2\n', "evaluation.enabled"),
    ("holdot = 0.2\n", "did you mean `evaluation.holdout`"),
])
def test_bad_evaluation_tables_name_the_key(tmp_path, table, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        SiteConfig.load(write(tmp_path, MINIMAL + "[evaluation]\n" + table))


def test_opting_out_needs_no_data(tmp_path):
    site = SiteConfig.load(write(tmp_path, MINIMAL + "[evaluation]\nenabled = false\n"))
    assert not site.evaluation.enabled


@pytest.mark.parametrize("num_classes", [2, 3])
def test_a_site_that_releases_no_scores_sends_its_figures_without_histograms_or_rows(tmp_path, monkeypatch, num_classes):
    """`release-scores = false` in site.toml: whatever the server asks, the reply carries n, AUC, accuracy and loss
    but empty histograms / prediction rows; the server accepts it, chooses the federation's rule without it and
    reports that site's accuracy at the rule as unknown, not as the argmax's."""
    import torch
    from flwr.app import ConfigRecord, RecordDict

    from fedtl.config import AdaptersConfig, FedTLConfig, ModelConfig
    from fedtl.evaluation import HIST_BINS
    from fedtl.federation.fedeval import SiteEvaluation, parse_eval_reply
    from fedtl.federation.handlers import handle_evaluate
    from fedtl.federation.records import to_record
    from fedtl.federation.site import SiteEvalData
    from fedtl.model import TransferModel
    from tests.conftest import make_tiny_backbone

    assert SiteConfig.load(write(tmp_path, MINIMAL + "[evaluation]\nholdout = 0.2\n")).evaluation.release_scores
    with pytest.raises(ConfigError, match="evaluation.release-scores"):
        SiteConfig.load(write(tmp_path, MINIMAL + '[evaluation]\nholdout = 0.2\nrelease-scores = "no"\n'))
    path = str(write(tmp_path, MINIMAL + "[evaluation]\nholdout = 0.2\nrelease-scores = false\n"))
    deployment.load_site_config.cache_clear()
    model = TransferModel(make_tiny_backbone(), num_classes, ModelConfig(pooling="avg"), AdaptersConfig(kind="none", blocks=0))
    y = torch.arange(60) % num_classes
    x = torch.randn(60, 16, generator=torch.Generator().manual_seed(0))
    x[torch.arange(60), y] += 2.0
    data = SiteEvalData("s", {"val": (x[:30], y[:30]), "test": (x[30:], y[30:])})
    monkeypatch.setattr(deployment, "cached_eval_site", lambda cfg, site_config, k: (model, data))
    request = RecordDict({"arrays": to_record(model.trainable_state()),
                          "config": ConfigRecord({"server-round": 1, "num-classes": num_classes})})
    cfg = FedTLConfig().with_overrides({"model.pooling": "avg"})
    reply = handle_evaluate(request, {}, {"site-config": path}, 7, cfg=cfg)
    metrics = reply["metrics"]
    assert metrics["evaluated"] == 1 and metrics["test-n"] == 30 and 0 <= metrics["test-auc"] <= 1
    assert metrics["val-hist-neg"] == [0] * HIST_BINS and metrics["val-hist-pos"] == [0] * HIST_BINS
    assert metrics["val-preds"] == [] and metrics["test-preds"] == []
    site, figs, _ = parse_eval_reply(reply, num_classes)  # accepted: an empty release is no release
    assert "hist_neg" not in figs["val"] and "preds" not in figs["val"]
    ev = SiteEvaluation()
    ev.add(site, figs, "")
    assert ev.choose_decision(num_classes).rule == "argmax"  # nothing released: nothing to choose on
    from fedtl.evaluation import Decision

    ev.apply(Decision("threshold", 0.4) if num_classes == 2 else Decision("bias", bias=(0.0, 0.5, -0.5)))
    row = ev.sites[site]
    assert np.isnan(row["test_acc"]) and row["test_acc_argmax"] == figs["test"]["acc"]


class _Images:
    def __init__(self, labels, fingerprint):
        self.labels, self.fingerprint = np.asarray(labels), fingerprint


def test_held_out_images_never_reach_training_and_the_split_is_kept(tmp_path):
    site = SiteConfig.load(write(tmp_path, MINIMAL + "[evaluation]\nholdout = 0.25\n"))
    images = _Images([0] * 60 + [1] * 40, "f1")
    split = site_split.evaluation_split(site, images)
    train, val, test = set(split["train"]), set(split["val"]), set(split["test"])
    assert not train & (val | test) and not val & test and train | val | test == set(range(100))
    assert len(val | test) == 25 and np.bincount(images.labels[sorted(val | test)]).tolist() == [15, 10]
    stored = json.loads((site.state_dir / site_split.SPLIT_FILE).read_text())
    assert stored["train"] == split["train"]
    assert site_split.evaluation_split(site, images) == split  # the same split on every later run and resume
    changed = site_split.evaluation_split(site, _Images([0] * 60 + [1] * 41, "f2"))  # new images: a new split
    assert changed["fingerprint"] == "f2" and len(changed["train"]) + len(changed["val"]) + len(changed["test"]) == 101


def test_a_damaged_split_file_is_replaced_not_trusted(tmp_path, caplog):
    site = SiteConfig.load(write(tmp_path, MINIMAL + "[evaluation]\nholdout = 0.2\n"))
    site.state_dir.mkdir(parents=True)
    (site.state_dir / site_split.SPLIT_FILE).write_text("{broken")
    split = site_split.evaluation_split(site, _Images([0, 1] * 20, "f"))
    assert len(split["train"]) == 32 and "unreadable" in caplog.text


def _folder_site(tmp_path, n, name):
    folder = tmp_path / name
    folder.mkdir()
    rows = ["file,label"]
    rng = np.random.default_rng(len(name))
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,{i % 2}")
    (tmp_path / f"{name}.csv").write_text("\n".join(rows) + "\n")


def test_a_deployed_site_trains_without_its_hold_out_and_evaluates_on_it(tmp_path, monkeypatch):
    from fedtl.config import FedTLConfig
    from tests.unit.federation.test_server import _tiny_model

    _folder_site(tmp_path, 40, "imgs")
    toml = ('name = "s"\n[data]\nformat = "folder"\npath = "imgs"\nlabels = "imgs.csv"\nimage-size = 12\n'
            '[evaluation]\nholdout = 0.25\n')
    path = str(write(tmp_path, toml))
    deployment.load_site_config.cache_clear()
    deployment._site_images.cache_clear()
    model = _tiny_model()
    cfg = FedTLConfig().with_overrides({"model.resolution": 32, "data.cache-dir": str(tmp_path / "cache")})
    monkeypatch.setattr(deployment, "preprocessing_for", lambda conf: _identity_preprocessing())
    train = deployment.deployed_site_data(cfg, model, path)
    ev = deployment.deployed_eval_data(cfg, model, path)
    assert len(train.labels) == 30 and len(ev.splits["val"][1]) + len(ev.splits["test"][1]) == 10
    all_feats = {tuple(r.tolist()) for r in train.features.flatten(1)}
    held = {tuple(r.tolist()) for s in ("val", "test") for r in ev.splits[s][0].flatten(1)}
    assert not all_feats & held  # no held-out image's features are in the training set


def _identity_preprocessing():
    from fedtl.backbones import get_spec
    from fedtl.data import Preprocessing

    return Preprocessing.for_backbone(get_spec("efficientnet_lite0"), 32)


def test_the_warm_path_without_a_backbone_also_keeps_the_hold_out_out_of_training(tmp_path, monkeypatch):
    """A site whose features are cached trains through `cached_site` (no backbone): the held-out images must be
    removed there too, and its evaluation requests get exactly the held-out ones."""
    import torch

    from fedtl.config import FedTLConfig

    _folder_site(tmp_path, 40, "imgs")
    path = str(write(tmp_path, 'name = "s"\n[data]\nformat = "folder"\npath = "imgs"\nlabels = "imgs.csv"\n'
                               'image-size = 12\n[evaluation]\nholdout = 0.25\n'))
    deployment.load_site_config.cache_clear()
    deployment._site_images.cache_clear()
    index = {img.tobytes(): i for i, img in enumerate(deployment._site_images(path).images.images)}
    asked = []

    def warm(cfg, site, images, n, views=1, test_time=False):  # row of image i: i (the site's i-th image)
        asked.append((test_time, len(images)))
        return "suffix-model", torch.tensor([[float(index[img.tobytes()])] * 4 for img in images.images])

    monkeypatch.setattr(deployment, "_warm", warm)
    model, train = deployment.cached_site(FedTLConfig(), path, 2)
    _, ev = deployment.cached_eval_site(FedTLConfig(), path, 2)
    trained = {int(r[0]) for r in train.features}
    held = {int(r[0]) for s in ("val", "test") for r in ev.splits[s][0]}
    assert len(trained) == 30 and len(held) == 10 and not trained & held and trained | held == set(range(40))
    assert asked == [(False, 40), (True, 10)]  # evaluation's views: for the held-out images alone
    split = site_split.evaluation_split(deployment.load_site_config(path), deployment._site_images(path).images)
    assert [int(r[0]) for r in ev.splits["test"][0]] == split["test"]  # each row is the image the split names
    assert ev.splits["test"][1].tolist() == [i % 2 for i in split["test"]]


def test_a_deployed_site_with_views_trains_on_every_view_of_its_training_images_only(tmp_path, monkeypatch):
    from fedtl.config import FedTLConfig
    from tests.unit.federation.test_server import _tiny_model

    _folder_site(tmp_path, 40, "imgs")
    path = str(write(tmp_path, 'name = "s"\n[data]\nformat = "folder"\npath = "imgs"\nlabels = "imgs.csv"\n'
                               'image-size = 12\n[evaluation]\nholdout = 0.25\n'))
    deployment.load_site_config.cache_clear()
    deployment._site_images.cache_clear()
    model = _tiny_model()
    monkeypatch.setattr(deployment, "preprocessing_for", lambda conf: _identity_preprocessing())
    one = FedTLConfig().with_overrides({"model.resolution": 32, "train.views": 1})
    plain = deployment.deployed_site_data(one, model, path)
    viewed = deployment.deployed_site_data(one.with_overrides({"train.views": 3}), model, path)
    built = []
    get_or_build = deployment.FeatureCache.get_or_build
    monkeypatch.setattr(deployment.FeatureCache, "get_or_build", lambda self, m, pre, data, *a, **k: (
        built.append((pre.view, len(data))), get_or_build(self, m, pre, data, *a, **k))[1])
    ev = deployment.deployed_eval_data(one.with_overrides({"train.views": 3}), model, path)
    assert built == [(0, 10), (1, 10), (2, 10)]  # test-time views of the 10 held-out images, not of all 40
    assert viewed.features.shape == (30, 3, plain.features.shape[1]) and plain.features.ndim == 2
    assert torch_equal(viewed.features[:, 0], plain.features) and torch_equal(viewed.labels, plain.labels)
    # evaluation scores test-time views (evaluation.views = auto: as many as training), the image itself first
    assert ev.splits["val"][0].shape[1] == 3
    single = deployment.deployed_eval_data(one.with_overrides({"train.views": 3, "evaluation.views": 1}), model, path)
    assert single.splits["val"][0].ndim == 2 and torch_equal(ev.splits["val"][0][:, 0], single.splits["val"][0])
    assert not torch_equal(ev.splits["val"][0][:, 1], single.splits["val"][0])
    assert viewed.cache_hit is False and deployment.deployed_site_data(
        one.with_overrides({"train.views": 3}), model, path).cache_hit is True


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)


def test_a_site_names_each_evaluation_images_split_in_its_labels_csv(tmp_path, monkeypatch, capsys, caplog):
    """`split-column`: the site's fixed test set stays its test set (a trial's random split put 25-30 of each site's
    60 "test" images into validation and its published test images into round selection); a row with another split
    value is skipped with its reason; changing a row's split makes a new stored split."""
    from fedtl.cli import main as cli
    from fedtl.config import FedTLConfig
    from tests.unit.federation.test_server import _tiny_model

    _folder_site(tmp_path, 20, "imgs")
    folder = tmp_path / "ev"
    folder.mkdir()
    rows = ["file,label,split"]
    rng = np.random.default_rng(5)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,{i % 2},{'test' if i >= 16 else ('Validation' if i % 3 else 'val')}")
    rows.append("extra.png,0,train")  # not a split an evaluation image can have
    (tmp_path / "ev.csv").write_text("\n".join(rows) + "\n")
    toml = ('name = "s"\n[data]\nformat = "folder"\npath = "imgs"\nlabels = "imgs.csv"\nimage-size = 12\n'
            '[evaluation]\nformat = "folder"\npath = "ev"\nlabels = "ev.csv"\nsplit-column = "split"\n')
    path = str(write(tmp_path, toml))
    for cached in (deployment.load_site_config, deployment._site_images, deployment._site_eval_images):
        cached.cache_clear()
    monkeypatch.setattr(deployment, "preprocessing_for", lambda conf: _identity_preprocessing())
    cfg = FedTLConfig().with_overrides({"model.resolution": 32, "data.cache-dir": str(tmp_path / "cache")})
    ev = deployment.deployed_eval_data(cfg, _tiny_model(), path)
    assert len(ev.splits["val"][1]) == 16 and len(ev.splits["test"][1]) == 8
    stored = json.loads(next(tmp_path.rglob(site_split.SPLIT_FILE)).read_text())
    assert stored["val"] == list(range(16)) and stored["test"] == list(range(16, 24))
    assert stored["split-column"] == "split"
    # asked again with nothing changed: the stored split is read, not made again (a trial saw "its evaluation images or
    # settings changed; making a new evaluation split" logged at every request)
    import logging

    stamp = next(tmp_path.rglob(site_split.SPLIT_FILE)).stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedtl.federation.site_split"):
        deployment.deployed_eval_data(cfg, _tiny_model(), path)
    assert "making a new evaluation split" not in caplog.text
    assert next(tmp_path.rglob(site_split.SPLIT_FILE)).stat().st_mtime_ns == stamp
    # `fedtl site check` shows exactly these counts, and the skipped row with its reason
    assert cli(["site", "check", path]) != 0  # an unreadable entry fails the check (--allow-bad accepts it)
    out, err = capsys.readouterr()
    assert "1 entries of the evaluation set are unreadable" in err
    assert "validation and test as its `split` column says" in out and "8 validation, 4 test" in out
    assert "`split` is 'train': must be `validation` (or `val`) or `test`" in out
    # a row moved from validation to test: a new split, as the CSV now says
    (tmp_path / "ev.csv").write_text("\n".join(rows).replace("0.png,0,val", "0.png,0,test") + "\n")
    deployment._site_eval_images.cache_clear()
    ev = deployment.deployed_eval_data(cfg, _tiny_model(), path)
    assert len(ev.splits["val"][1]) == 15 and len(ev.splits["test"][1]) == 9
    # the column removed from site.toml: a stratified random split again, not the pinned one kept
    write(tmp_path, toml.replace('split-column = "split"\n', "validation-fraction = 0.5\n"))
    for cached in (deployment.load_site_config, deployment._site_eval_images):
        cached.cache_clear()
    ev = deployment.deployed_eval_data(cfg, _tiny_model(), path)
    stored = json.loads(next(tmp_path.rglob(site_split.SPLIT_FILE)).read_text())
    assert "split-column" not in stored and len(ev.splits["val"][1]) == len(ev.splits["test"][1]) == 12


@pytest.mark.parametrize("table,message", [
    ('format = "folder"\npath = "t"\nlabels = "t.csv"\nsplit-column = "split"\nvalidation-fraction = 0.5\n',
     "not used with `split-column`"),
    ('format = "medmnist"\npath = "t.npz"\nsplit-column = "split"\n', "only used with data.format"),
    ('holdout = 0.2\nsplit-column = "split"\n', "needs \\[evaluation\\]'s own labelled data"),
    ('format = "folder"\npath = "t"\nlabels = "t.csv"\nsplit-column = "file"\n', "other than `file`"),
])
def test_a_split_column_where_it_cannot_apply_is_refused(tmp_path, table, message):
    with pytest.raises(ConfigError, match=message):
        SiteConfig.load(write(tmp_path, MINIMAL + "[evaluation]\n" + table))


def test_a_labels_csv_without_the_split_column_is_refused_by_name(tmp_path):
    from fedtl.data.site_sources import read_labels_csv
    from fedtl.errors import DataError

    (tmp_path / "l.csv").write_text("file,label\na.png,0\n")
    with pytest.raises(DataError, match="no `split` column.*expected `file,label,split`"):
        read_labels_csv(tmp_path / "l.csv", split_column="split")

