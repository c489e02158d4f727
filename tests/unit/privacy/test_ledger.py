"""The ledger: cumulative, durable, locked, tamper-evident; attacks on it are refused."""

import json
import multiprocessing
import shutil
import threading
import time

import pytest

from fedtl.errors import LedgerError
from fedtl.privacy import open_ledger, read_ledger
from fedtl.privacy.accounting import make_accountant

SITE = {"site": "st-mary", "delta": 1e-5, "accountant": "rdp"}


def _train(path, run="r", rnd=1, sigma=1.0, q=0.1, steps=10, hold: float = 0.0):
    with open_ledger(path, **SITE) as ledger:
        time.sleep(hold)  # "training" while the lock is held
        ledger.append(run=run, round=rnd, noise_multiplier=sigma, sample_rate=q, steps=steps)
        ledger.save()
        return ledger.epsilon()


def test_restored_ledger_gives_the_same_epsilon_and_never_decreases(tmp_path):
    path = tmp_path / "privacy-ledger.json"
    eps = [_train(path, rnd=r) for r in range(1, 5)]  # each a fresh open: a restart
    assert eps == sorted(eps) and eps[0] > 0 and len(set(eps)) == 4
    ledger = read_ledger(path)
    assert ledger.epsilon() == pytest.approx(eps[-1])
    # independent recomputation with Opacus' own accountant over the stored history
    assert make_accountant("rdp", ledger.history).get_epsilon(1e-5) == pytest.approx(eps[-1], rel=1e-9)
    assert [e["round"] for e in ledger.entries] == [1, 2, 3, 4]


def test_two_trainings_at_once_both_land_threads(tmp_path):
    path = tmp_path / "privacy-ledger.json"
    threads = [threading.Thread(target=_train, args=(path,), kwargs={"rnd": r, "hold": 0.3}) for r in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(e["round"] for e in read_ledger(path).entries) == [1, 2]


def _proc_train(path, rnd):
    _train(path, rnd=rnd, hold=0.3)


def test_two_trainings_at_once_both_land_processes(tmp_path):
    path = tmp_path / "privacy-ledger.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_proc_train, args=(path, r)) for r in (1, 2, 3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    ledger = read_ledger(path)
    assert sorted(e["round"] for e in ledger.entries) == [1, 2, 3]
    assert ledger.epsilon() == pytest.approx(make_accountant("rdp", [(1.0, 0.1, 30)]).get_epsilon(1e-5))


def test_deleted_ledger_is_refused_not_restarted_at_zero(tmp_path):
    path = tmp_path / "privacy-ledger.json"
    _train(path)
    path.unlink()
    with pytest.raises(LedgerError, match=r"missing, but this state-dir has held one .*restore privacy-ledger.json"):
        with open_ledger(path, **SITE):
            pass
    assert not path.exists()


@pytest.mark.parametrize("edit", ["steps", "sigma", "delta", "accountant", "drop-last", "drop-first"])
def test_edited_ledger_is_refused_and_left_untouched(tmp_path, edit):
    path = tmp_path / "privacy-ledger.json"
    for r in (1, 2):
        _train(path, rnd=r)
    raw = json.loads(path.read_text())
    if edit == "steps":
        raw["entries"][0]["steps"] = 1
    elif edit == "sigma":
        raw["entries"][1]["noise_multiplier"] = 50.0
    elif edit == "delta":
        raw["delta"] = 1e-3
    elif edit == "accountant":
        raw["accountant"] = "prv"
    elif edit == "drop-last":
        raw["entries"] = raw["entries"][:1]
    else:
        raw["entries"] = raw["entries"][1:]
    path.write_text(json.dumps(raw))
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="integrity|rolled back|older than|pinned|accountant"):
        kwargs = dict(SITE, delta=raw["delta"], accountant=raw["accountant"])
        with open_ledger(path, **kwargs):
            pass
    assert path.read_bytes() == before


def test_rolled_back_ledger_is_refused(tmp_path):
    path = tmp_path / "privacy-ledger.json"
    _train(path, rnd=1)
    old = tmp_path / "backup.json"
    shutil.copy(path, old)
    _train(path, rnd=2)
    shutil.copy(old, path)  # an intact but older ledger: the chain verifies, the anchor does not
    with pytest.raises(LedgerError, match="rolled back"):
        with open_ledger(path, **SITE):
            pass


def test_delta_and_accountant_are_pinned(tmp_path):
    path = tmp_path / "privacy-ledger.json"
    _train(path)
    with pytest.raises(LedgerError, match=r"δ=1e-05; the site's policy says δ=0.001"):
        with open_ledger(path, **dict(SITE, delta=1e-3)):
            pass
    with pytest.raises(LedgerError, match="`rdp` accountant"):
        with open_ledger(path, **dict(SITE, accountant="prv")):
            pass


def test_corrupt_or_foreign_ledger_is_refused_and_left_intact(tmp_path):
    path = tmp_path / "privacy-ledger.json"
    path.write_text("{not json")
    with pytest.raises(LedgerError, match="corrupt"):
        with open_ledger(path, **SITE):
            pass
    assert path.read_text() == "{not json"
    other = tmp_path / "b" / "privacy-ledger.json"
    _train(other)
    with pytest.raises(LedgerError, match="belongs to site `st-mary`"):
        with open_ledger(other, **dict(SITE, site="other")):
            pass


def test_a_ledger_only_grows(tmp_path):
    path = tmp_path / "privacy-ledger.json"
    _train(path)
    with open_ledger(path, **SITE) as ledger:
        ledger.entries.pop()
        with pytest.raises(LedgerError, match="only grows"):
            ledger.save()
    with open_ledger(path, **SITE) as ledger:
        with pytest.raises(LedgerError):
            ledger.append(run="r", round=2, noise_multiplier=float("nan"), sample_rate=0.1, steps=1)
    assert len(read_ledger(path).entries) == 1


def test_lock_is_exclusive_with_a_clear_timeout(tmp_path):
    path = tmp_path / "privacy-ledger.json"
    with open_ledger(path, **SITE):
        with pytest.raises(LedgerError, match="stayed locked"):
            with open_ledger(path, **SITE, timeout=0.2):
                pass
