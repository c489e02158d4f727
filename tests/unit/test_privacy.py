import json
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedtl.config import AdaptersConfig, ModelConfig, PrivacyConfig, TrainConfig
from fedtl.errors import LedgerError
from fedtl.model import TransferModel
from fedtl.privacy import PrivacyLedger, calibrate_noise, epsilon_of
from fedtl.privacy.accounting import make_accountant
from fedtl.privacy.engine import make_private, unwrap
from fedtl.training import train_suffix


def _one_step(dp: bool, noise: float, clip: float, scale: float = 1.0, lr: float = 0.1):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 3))
    x, y = torch.randn(16, 6) * scale, torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    before = [p.detach().clone() for p in net.parameters()]
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    module = net
    if dp:
        module, opt, loader, _ = make_private(net, opt, loader, noise_multiplier=noise, max_grad_norm=clip,
                                              accountant="rdp", history=[])
    opt.zero_grad()
    with warnings.catch_warnings():  # Opacus hooks on inputs that need no grad: torch notes it
        warnings.simplefilter("ignore")
        nn.functional.cross_entropy(module(x), y).backward()  # the full batch: expected batch size 16
    opt.step()
    unwrap(module)
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(net.parameters(), before)])


def test_dp_with_zero_noise_and_huge_clip_equals_plain_sgd():
    assert torch.allclose(_one_step(True, 0.0, 1e6), _one_step(False, 0.0, 0.0), atol=1e-6)


def test_clipping_bounds_each_sample_contribution():
    clip, lr = 0.01, 0.1
    delta = _one_step(True, 0.0, clip, scale=1000.0, lr=lr)
    assert 0 < delta.norm() <= lr * clip * (1 + 1e-4)  # mean of 16 clipped grads, each of norm <= C
    assert _one_step(False, 0.0, 0.0, scale=1000.0, lr=lr).norm() > 100 * lr * clip


def test_fast_rdp_matches_opacus_accountant():
    history = [(0.9, 0.02, 120), (1.3, 0.1, 7), (0.9, 0.02, 5)]
    assert epsilon_of(history, 1e-5) == pytest.approx(make_accountant("rdp", history).get_epsilon(1e-5), rel=1e-12)


def test_calibrated_noise_meets_the_budget():
    sigma = calibrate_noise(3.0, 1e-5, 0.05, 400)
    eps = epsilon_of([(sigma, 0.05, 400)], 1e-5)
    assert 2.95 <= eps <= 3.0


def _train_round(model, ledger, r, rounds=4, eps_budget=3.0, noise=0.0):
    feats, labels = model.prefix_features(torch.randn(48, 3, 12, 12)), torch.randint(0, 2, (48,))
    return train_suffix(model, feats, labels, TrainConfig(lr=0.1, batch_size=8),
                        privacy=PrivacyConfig(target_epsilon=eps_budget, noise_multiplier=noise), ledger=ledger,
                        run_id="run", server_round=r, total_rounds=rounds)


def test_ledger_is_cumulative_durable_and_never_decreases(tiny_backbone, tmp_path):
    model = TransferModel(tiny_backbone, 2, ModelConfig(), AdaptersConfig(kind="none", blocks=0))
    path = tmp_path / "site" / "ledger.json"
    eps = []
    for r in range(1, 5):
        ledger = PrivacyLedger.open(path, site="a", target_epsilon=3.0, delta=1e-5, accountant="rdp")  # a restart each round
        assert ledger.epsilon() == pytest.approx(eps[-1] if eps else 0.0)
        eps.append(_train_round(model, ledger, r).epsilon)
    assert eps == sorted(eps) and eps[0] > 0
    assert eps[-1] <= 3.0 and eps[-1] > 2.9  # the planned rounds use the whole budget, never more
    on_disk = json.loads(path.read_text())
    assert on_disk["epsilon"] == pytest.approx(eps[-1]) and len(on_disk["rounds"]) == 4


def test_spent_budget_declines_with_a_reason_and_keeps_the_ledger(tiny_backbone, tmp_path):
    model = TransferModel(tiny_backbone, 2, ModelConfig(), AdaptersConfig(kind="none", blocks=0))
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path, site="st-mary", target_epsilon=1.0, delta=1e-5, accountant="rdp")
    results = [_train_round(model, ledger, r, rounds=10, eps_budget=1.0, noise=4.0) for r in range(1, 11)]
    declined = [r for r in results if r.declined]
    assert declined and not results[0].declined
    assert "Site `st-mary` has spent" in declined[0].reason and "will not train" in declined[0].reason
    before = path.read_bytes()
    state = model.trainable_state()
    again = _train_round(model, PrivacyLedger.open(path, site="st-mary", target_epsilon=1.0, delta=1e-5, accountant="rdp"),
                         11, rounds=10, eps_budget=1.0, noise=4.0)
    assert again.declined and path.read_bytes() == before  # nothing spent, nothing written
    assert all(torch.equal(v, model.trainable_state()[k]) for k, v in state.items())
    assert max(r.epsilon for r in results) <= 1.0


def test_corrupt_or_foreign_ledger_is_refused_and_left_intact(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text("{not json")
    with pytest.raises(LedgerError, match="corrupt"):
        PrivacyLedger.open(path, site="a", target_epsilon=3, delta=1e-5, accountant="rdp")
    assert path.read_text() == "{not json"
    good = PrivacyLedger.open(tmp_path / "b.json", site="b", target_epsilon=3, delta=1e-5, accountant="rdp")
    good.record_round([(1.0, 0.1, 10)], round=1)
    good.save()
    with pytest.raises(LedgerError, match="belongs to site `b`"):
        PrivacyLedger.open(tmp_path / "b.json", site="a", target_epsilon=3, delta=1e-5, accountant="rdp")


def test_ledger_refuses_to_rewrite_history(tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "l.json", site="a", target_epsilon=3, delta=1e-5, accountant="rdp")
    ledger.record_round([(1.0, 0.1, 10)], round=1)
    ledger.save()
    ledger.history = [(1.0, 0.1, 5)]  # fewer steps than saved: ε would go down
    with pytest.raises(LedgerError, match="only grows"):
        ledger.save()
    with pytest.raises(LedgerError):
        ledger.record_round([(2.0, 0.1, 3)], round=2)
