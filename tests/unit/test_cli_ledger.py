"""`fedtl site ledger`: the verified history and ε under both accountants; a tampered ledger exits 4."""

import json

from fedtl.cli import main
from fedtl.privacy import epsilon_of, open_ledger


def _site(tmp_path):
    (tmp_path / "d.npz").write_bytes(b"")
    conf = tmp_path / "site.toml"
    conf.write_text('name = "st-mary"\nstate-dir = "state"\n[data]\nformat = "medmnist"\npath = "d.npz"\n'
                    '[privacy]\ntarget-epsilon = 2.0\naccountant = "rdp"\n')
    return conf


def test_site_ledger_prints_history_and_both_accountants(tmp_path, capsys):
    conf = _site(tmp_path)
    with open_ledger(tmp_path / "state" / "privacy-ledger.json", site="st-mary", delta=1e-5, accountant="rdp") as led:
        for r in (1, 2):
            led.append(run="run-9", round=r, noise_multiplier=2.0, sample_rate=0.25, steps=4)
        led.save()
    assert main(["site", "ledger", str(conf), "--json"]) == 0
    out = capsys.readouterr().out
    body = json.loads(out.strip().splitlines()[-1])
    assert [e["round"] for e in body["entries"]] == [1, 2]
    assert body["epsilon_rdp"] == epsilon_of([(2.0, 0.25, 8)], 1e-5, "rdp")
    assert 0 < body["epsilon_prv"] <= body["epsilon_rdp"]
    assert "chain verified" in out and "run-9" in out


def write_tampered_ledger(path, site="st-mary"):
    """A ledger of one round whose noise multiplier was edited afterwards (20 instead of 2: less ε on paper)."""
    with open_ledger(path, site=site, delta=1e-5, accountant="rdp") as led:
        led.append(run="r", round=1, noise_multiplier=2.0, sample_rate=0.25, steps=4)
        led.save()
    raw = json.loads(path.read_text())
    raw["entries"][0]["noise_multiplier"] = 20.0
    path.write_text(json.dumps(raw))


def test_site_ledger_refuses_a_tampered_ledger(tmp_path, capsys):
    conf = _site(tmp_path)
    write_tampered_ledger(tmp_path / "state" / "privacy-ledger.json")
    assert main(["site", "ledger", str(conf)]) == 4
    assert "integrity check" in capsys.readouterr().err


def test_site_ledger_without_any_ledger(tmp_path, capsys):
    assert main(["site", "ledger", str(_site(tmp_path))]) == 4
    assert "has not trained yet" in capsys.readouterr().err
