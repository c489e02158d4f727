"""Bad input: one-line error, documented exit code, nothing written."""

import numpy as np
import pytest

from fedtl.cli import main


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDTL_CACHE_DIR", str(cache))
    return tmp_path, cache


def _run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("argv,code,fragment", [
    (["--set", "privacy.target-epsilom=3"], 2, "did you mean `privacy.target-epsilon`"),
    (["--set", "privacy.target-epsilon=-1"], 2, "`privacy.target-epsilon` must be > 0, got -1.0"),
    (["--set", "federation.rounds=ten"], 2, "`federation.rounds` must be an integer"),
    (["--set", "model.backbone=resnet_18"], 5, "did you mean `resnet18`"),
    (["--data", "/nonexistent/file.npz"], 3, "does not exist"),
    (["--set", "noequals"], 2, "key=value"),
])
def test_bad_input_exits_nonzero_with_one_line_and_writes_nothing(isolated, capsys, argv, code, fragment):
    tmp, cache = isolated
    out = tmp / "run"
    rc, err = _run(capsys, ["simulate", "--out", str(out), *argv])
    assert rc == code
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0]
    assert not out.exists() and not cache.exists()


def test_corrupt_data_file(isolated, capsys):
    tmp, cache = isolated
    bad = tmp / "bad.npz"
    bad.write_bytes(np.arange(10).tobytes())
    rc, err = _run(capsys, ["simulate", "--out", str(tmp / "run"), "--data", str(bad)])
    assert rc == 3 and "not a readable .npz" in err[0]
    assert not (tmp / "run").exists() and not cache.exists()


def test_existing_run_directory_is_not_touched(isolated, capsys):
    tmp, _ = isolated
    out = tmp / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    rc, err = _run(capsys, ["simulate", "--out", str(out)])
    assert rc == 2 and "already exists" in err[0]
    assert (out / "summary.json").read_text() == "{}"


def test_config_file_with_tables(tmp_path, capsys):
    conf = tmp_path / "c.toml"
    conf.write_text('[privacy]\ntarget-epsilon = 1.5\n[federation]\nsites = 4\n')
    assert main(["config", "--config", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "privacy.target-epsilon = 1.5" in out and "federation.sites = 4" in out


def test_the_summary_names_the_per_class_offsets_and_the_argmax_beside_them(capsys):
    from fedtl.cli import print_summary

    sites = {"per_site": {"sites": {"site-0": {"test_n": 20, "test_auc": 0.7, "test_acc": 0.45, "test_acc_argmax": 0.6}},
                          "pooled": {"test_n": 20, "test_auc": 0.7, "test_acc": 0.45, "test_acc_argmax": 0.6}}}
    print_summary({"test_auc": 0.7, "test_acc": 0.54, "test_acc_argmax": 0.45, **sites,
                   "decision": {"rule": "bias", "bias": [0.0, 0.3, -0.2]}})
    out = capsys.readouterr().out
    assert "accuracy 0.5400 (per-class offsets; argmax 0.4500)" in out
    # the sites release prediction rows, so their accuracies are at the offsets, and the argmax's stand beside them (a
    # federation's rule can cost a site with another class mix: RetinaMNIST site-0 0.455 → 0.227)
    assert "at the argmax" not in out and "argmax" in out.splitlines()[2]
    assert "site-0" in out and "0.4500  0.6000" in out
    print_summary({"test_auc": 0.9, "test_acc": 0.88, **sites, "decision": {"rule": "threshold", "threshold": 0.6}})
    assert "at the argmax;" not in capsys.readouterr().out  # a threshold reaches the sites: their figures use it
