"""simulations/benchmarks/bench.py keeps what it did not re-run: `--rows` re-runs some accuracy rows of results.json and
must leave the others in place (it once replaced the whole table by the rows just run, losing 11 measured rows)."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "simulations" / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import bench as module

    calls = []

    def fake_run(cfg, model_kind="transfer"):
        calls.append(cfg)
        return {"test_auc": 0.9 + 0.01 * cfg.train.seed, "test_acc": 0.8, "test_acc_argmax": 0.7, "eps_max": 8.0,
                "trainable_params": 10, "seconds": 1.0}

    monkeypatch.setattr(module, "run_inprocess", fake_run)
    module.calls = calls
    return module


def test_re_running_some_rows_keeps_the_others_and_replaces_those_of_the_same_name(bench, tmp_path, monkeypatch):
    def row(name, auc):
        return {"name": name, "model": "transfer", "seeds": 5, "test_auc_mean": auc, "test_auc_std": 0.0,
                "test_acc_mean": 0.5, "test_acc_std": 0.0, "test_acc_argmax_mean": 0.5, "test_acc_argmax_std": 0.0,
                "eps_max": 3.0, "trainable_params": 10, "overrides": {"privacy.target-epsilon": 3.0}}

    kept = row("an earlier row", 0.5)
    stale = row("federated 10 sites, DP ε=8, train.views=1, mean pooling", 0.1)
    (tmp_path / "results.json").write_text(json.dumps({"accuracy": [kept, stale], "other": {"x": 1}}))
    monkeypatch.setattr(sys, "argv", ["bench.py", "--out", str(tmp_path), "--only", "accuracy", "--rows", "ε=8"])
    bench.main()
    results = json.loads((tmp_path / "results.json").read_text())
    names = [r["name"] for r in results["accuracy"]]
    assert names == ["an earlier row", stale["name"]]  # the row run now replaced the stale one, in its place
    assert results["accuracy"][0] == kept
    assert results["accuracy"][1]["test_auc_mean"] == pytest.approx(0.92) and len(bench.calls) == 5
    assert results["other"] == {"x": 1}  # other sections untouched
    assert "an earlier row" in (tmp_path / "results.md").read_text()


def test_row_picks_one_row_by_its_exact_name_even_with_commas_and_refuses_an_unknown_one(bench, tmp_path, monkeypatch,
                                                                                         capsys):
    # `--rows "DP ε=3, model.resolution=64"` splits at the comma and selects every ε=3 row; `--row` takes the name whole
    name = "federated 10 sites, DP ε=3, model.resolution=64 (tried, not adopted)"
    monkeypatch.setattr(sys, "argv", ["bench.py", "--out", str(tmp_path), "--only", "accuracy", "--row", name])
    bench.main()
    assert [r["name"] for r in json.loads((tmp_path / "results.json").read_text())["accuracy"]] == [name]
    assert len(bench.calls) == 5 and all(c.model.resolution == 64 for c in bench.calls)
    assert f"accuracy rows to run (1, 5 seeds each):\n  {name}" in capsys.readouterr().err
    assert len(bench.selected_rows(only=("DP ε=3", " model.resolution=64"))) > 3  # what the comma did
    typo = "federated 10 sites, DP ε=3 (the defualt)"
    monkeypatch.setattr(sys, "argv", ["bench.py", "--out", str(tmp_path), "--only", "accuracy", "--row", typo])
    with pytest.raises(SystemExit, match=r"no accuracy row is named .*defualt.*; closest: \['federated 10 sites, DP ε=3 \(the default\)'"):
        bench.main()


def test_slow_rows_run_only_when_named(bench):
    everything = [name for name, _, _ in bench.selected_rows()]
    assert everything and not any(name.startswith(bench.SLOW) for name in everything)
    slow = [name for name, _, _ in bench.accuracy_plan() if name.startswith(bench.SLOW)]
    assert len(slow) == 3
    assert [n for n, _, _ in bench.selected_rows(only=("whole network",))] == [slow[2]]
    assert [n for n, kind, _ in bench.selected_rows(exact=(slow[1],))] == [slow[1]]
    assert [kind for n, kind, _ in bench.selected_rows(exact=(slow[2],))] == ["full"]
