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
