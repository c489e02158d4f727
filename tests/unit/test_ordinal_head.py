"""`model.head = ordinal`: one score and C − 1 ordered cut points (the proportional-odds model) in place of C logits."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fedtl.config import AdaptersConfig, FedTLConfig, ModelConfig, TrainConfig
from fedtl.data.preprocess import Preprocessing
from fedtl.decision import Decision
from fedtl.errors import ConfigError
from fedtl.export import export_run
from fedtl.inference import RunModel, _num_classes
from fedtl.model import CumulativeLink, Suffix, SuffixModel, TransferModel
from fedtl.training import DPSettings, evaluate_suffix, train_suffix
from tests.conftest import tiny_spec


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_the_head_outputs_log_probabilities_uniform_at_start_and_ordered_in_the_score(classes):
    link = CumulativeLink(classes)
    scores = torch.linspace(-8, 8, 33).unsqueeze(1)
    logp = link(scores)
    assert logp.shape == (33, classes)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(33))
    torch.testing.assert_close(link(torch.zeros(1, 1)).exp(), torch.full((1, classes), 1 / classes))
    # a higher score moves mass to higher classes: every P(y <= j) falls as the score rises
    cumulative = logp.exp().cumsum(-1)[:, :-1]
    assert (cumulative[1:] <= cumulative[:-1] + 1e-6).all()
    assert int(logp[0].argmax()) == 0 and int(logp[-1].argmax()) == classes - 1


def test_two_classes_are_logistic_regression_on_one_logit():
    link = CumulativeLink(2)
    with torch.no_grad():
        link.cuts.fill_(0.7)
    s = torch.randn(10, 1)
    torch.testing.assert_close(link(s).exp()[:, 1:], torch.sigmoid(s - 0.7))


def test_any_finite_cut_points_and_scores_give_finite_ordered_probabilities_and_gradients():
    """A server or a peer may send any finite tensor: the thresholds stay increasing, nothing becomes NaN."""
    link = CumulativeLink(5)
    with torch.no_grad():
        link.cuts.copy_(torch.tensor([3e4, -1e4, 0.0, 1e4]))
    theta = link.thresholds()
    assert (theta[1:] >= theta[:-1]).all()
    s = torch.tensor([[-1e6], [0.0], [1e6]], requires_grad=True)
    logp = link(s)
    assert torch.isfinite(logp).all() and torch.isfinite(logp.exp().sum(-1)).all()
    logp[:, 2].sum().backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(link.cuts.grad).all()


def test_fewer_than_two_classes_is_a_config_error():
    with pytest.raises(ConfigError, match="needs at least 2 classes, got 1"):
        CumulativeLink(1)


def test_a_bad_head_name_lists_the_ordinal_choice():
    with pytest.raises(ConfigError, match="ordinal"):
        FedTLConfig.from_run_config({"model.head": "logistic"})


def _ordinal_data(n=240, d=6, classes=4, seed=0):
    """Grades from one latent score: what the proportional-odds model assumes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    latent = x @ torch.tensor([1.0, -0.5, 0.8, 0.0, 0.0, 0.3]) + 0.3 * torch.randn(n, generator=g)
    cuts = torch.quantile(latent, torch.linspace(0, 1, classes + 1)[1:-1])
    return x, torch.bucketize(latent, cuts)


@pytest.mark.slow
def test_the_ordinal_head_learns_grades_under_dp_sgd_with_per_example_gradients():
    """Opacus computes the cut points' per-example gradients (a module of its own, outside its layer list) and the
    head learns: macro one-vs-rest AUC well above chance on held-out grades."""
    from opacus import GradSampleModule

    x, y = _ordinal_data()
    suffix = Suffix(torch.nn.Sequential(), 6, 4, ModelConfig(head="ordinal", pooling="avg"))
    gsm = GradSampleModule(suffix)
    torch.nn.functional.cross_entropy(gsm(x[:8]), y[:8]).backward()
    cut_grads = gsm._module.head[1].cuts.grad_sample
    assert cut_grads.shape == (8, 3) and torch.isfinite(cut_grads).all() and cut_grads.abs().sum() > 0
    gsm._close()

    # the head-only model as a site trains it on cached features
    model = SuffixModel("tiny", "0" * 64, "b2", 6, 4, ModelConfig(head="ordinal", pooling="avg"))
    dp = DPSettings(noise_multiplier=0.8, max_grad_norm=1.0, sample_rate=32 / 160)
    train_suffix(model, x[:160], y[:160], TrainConfig(lr=0.5, batch_size=32, epochs=8), dp=dp)
    metrics = evaluate_suffix(model, x[160:], y[160:])
    assert metrics.auc > 0.8, metrics
    assert model.param_counts()["trainable_params"] == 6 + 1 + 3  # one score and three cut points, not 4 × 7


def _ordinal_run(backbone, classes=3) -> RunModel:
    model = TransferModel(backbone, classes, ModelConfig(head="ordinal"), AdaptersConfig(kind="none"))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    model.eval()
    return RunModel(run_dir=None, config=FedTLConfig.from_run_config({"model.head": "ordinal"}), model=model,
                    preprocessing=Preprocessing.for_backbone(tiny_spec(), 16), decision=Decision("bias", bias=(0.0, 0.3, 0.0)),
                    metadata={"round": "3", "weights_sha256": "0" * 64})


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_an_ordinal_run_exports_to_onnx_and_torchscript_with_the_probabilities_predict_gives(tiny_backbone, toy_images, tmp_path):
    pytest.importorskip("onnxruntime")
    run = _ordinal_run(tiny_backbone)
    images = toy_images[0][:12]
    probs = run.probabilities(images)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    report = export_run(run, "onnx", tmp_path / "m.onnx", images, latency_runs=1)
    assert report.max_abs_diff <= 1e-4 and report.checked_images == 12
    report = export_run(run, "torchscript", tmp_path / "m.pt", images, latency_runs=1)
    assert report.max_abs_diff <= 1e-4 and report.checked_images == 12


def test_predict_reads_the_class_count_from_the_cut_points_and_names_a_malformed_one(tmp_path):
    state = {"suffix.head.0.weight": torch.zeros(1, 8), "suffix.head.0.bias": torch.zeros(1),
             "suffix.head.1.cuts": torch.zeros(4)}
    assert _num_classes(state, tmp_path / "suffix.safetensors") == 5
    state["suffix.head.1.cuts"] = torch.zeros(2, 2)
    save_file(state, str(tmp_path / "suffix.safetensors"))
    with pytest.raises(ConfigError, match=r"`suffix.head.1.cuts` has shape \(2, 2\); an ordinal head's cut points"):
        _num_classes(state, tmp_path / "suffix.safetensors")
