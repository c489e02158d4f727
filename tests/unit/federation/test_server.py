import pytest

from fedtl.errors import ConfigError
from fedtl.federation.server import prepare_run_dir


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
