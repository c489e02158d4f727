"""fedtl.inference and fedtl.export on a tiny model: inputs, LoRA merging, the exported decision rule, atomic files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fedtl.config import FedTLConfig
from fedtl.data.preprocess import Preprocessing
from fedtl.decision import Decision
from fedtl.errors import ConfigError
from fedtl.export import ExportedModel, ExportError, export_run, merge_lora
from fedtl.inference import RunModel, check_run_dir, collect_inputs, read_inputs
from fedtl.model import TransferModel
from tests.conftest import tiny_spec


def tiny_run(backbone, decision=Decision(), kind="lora", views=0) -> RunModel:
    cfg = FedTLConfig().with_overrides({"adapters.kind": kind, "adapters.blocks": 2, "adapters.rank": 2,
                                        "evaluation.views": views})
    model = TransferModel(backbone, 2, cfg.model, cfg.adapters)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # as after training: LoRA's B (zero at start) and the head are not zero
                p.normal_(0, 0.3)
    model.eval()
    return RunModel(run_dir=None, config=cfg, model=model, preprocessing=Preprocessing.for_backbone(tiny_spec(), 16),
                    decision=decision, metadata={"round": "3", "weights_sha256": "0" * 64})


def test_merged_lora_computes_the_same_function_without_peft_layers(tiny_backbone):
    from peft.tuners.lora import LoraLayer

    run = tiny_run(tiny_backbone)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        before = run.model(x)
        merged = run.model.suffix.blocks
        assert any(isinstance(m, LoraLayer) for m in merged.modules())
        import copy

        copied = copy.deepcopy(run.model)
        assert merge_lora(copied) == 2  # b2's and head_conv's 1x1 convolutions
        assert not any(isinstance(m, LoraLayer) for m in copied.modules())
        torch.testing.assert_close(copied(x), before, atol=1e-5, rtol=1e-5)


def test_exported_module_normalizes_and_applies_the_runs_decision_rule(tiny_backbone, toy_images):
    images = toy_images[0][:32]
    argmax_run = tiny_run(tiny_backbone)
    probs = argmax_run.probabilities(images)
    threshold = float(np.median(probs[:, 1]))
    run = tiny_run(tiny_backbone, Decision("threshold", threshold, 1))
    module = ExportedModel(run)
    with torch.no_grad():
        out_probs, labels = module(run.preprocessing.to_unit(images))  # [0, 1] in: normalization is inside
    np.testing.assert_allclose(out_probs.numpy(), probs, atol=1e-5)
    np.testing.assert_array_equal(labels.numpy(), run.decision.apply(out_probs.numpy()))
    assert labels.dtype == torch.int64 and 0 < int(labels.sum()) < 32
    assert not np.array_equal(labels.numpy(), probs.argmax(1))  # the threshold rule, not the argmax


def test_exported_module_applies_a_bias_rule_like_predict(tiny_backbone, toy_images, tmp_path):
    images = toy_images[0][:32]
    probs = tiny_run(tiny_backbone).probabilities(images)
    offset = float(np.median(np.log(probs[:, 0]) - np.log(probs[:, 1])))  # moves half the labels
    run = tiny_run(tiny_backbone, Decision("bias", bias=(0.0, offset)))
    with torch.no_grad():
        out_probs, labels = ExportedModel(run)(run.preprocessing.to_unit(images))
    np.testing.assert_array_equal(labels.numpy(), run.decision.apply(out_probs.numpy()))
    assert not np.array_equal(labels.numpy(), probs.argmax(1))
    report = export_run(run, "torchscript", tmp_path / "b.pt", images, latency_runs=1)
    assert report.max_abs_diff <= 1e-4


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_is_checked_and_atomic(tiny_backbone, toy_images, tmp_path):
    run = tiny_run(tiny_backbone, Decision("threshold", 0.3, 0))
    images = toy_images[0][:8]
    out = tmp_path / "m.pt"
    report = export_run(run, "torchscript", out, images, latency_runs=2)
    assert report.max_abs_diff <= 1e-4 and report.bytes == out.stat().st_size and report.checked_images == 8
    extra = {"fedtl.decision": "", "fedtl.input": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["fedtl.decision"]) == {"rule": "threshold", "positive-class": 0, "threshold": 0.3}
    assert b"(N, 3, 16, 16)" in extra["fedtl.input"]
    torch.testing.assert_close(loaded(run.preprocessing.to_unit(images))[0], torch.from_numpy(run.probabilities(images)),
                               atol=1e-4, rtol=0)
    with pytest.raises(ExportError, match="nothing was written"):
        export_run(run, "torchscript", tmp_path / "strict.pt", images, tolerance=-1.0, latency_runs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    with pytest.raises(ConfigError, match="--format must be one of onnx, torchscript, got 'tflite'"):
        export_run(run, "tflite", tmp_path / "m.tflite", images)


def test_inputs_are_image_and_dicom_files_and_folders_others_named(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.fromarray(np.full((10, 14), 100, np.uint8)).save(tmp_path / "a" / "x.png")
    Image.fromarray(np.full((10, 10, 3), 200, np.uint8)).save(tmp_path / "a" / "b" / "y.JPG")
    (tmp_path / "a" / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)  # a DICOM by its preamble
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "a" / "README").write_text("no suffix, not DICOM")
    (tmp_path / "empty").mkdir()
    files, problems = collect_inputs([tmp_path / "a", tmp_path / "a" / "notes.txt", tmp_path / "gone.png", tmp_path / "empty"])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a/IM0001", "a/b/y.JPG", "a/x.png", "a/notes.txt"]
    assert [(p.file, p.reason) for p in problems] == [(str(tmp_path / "gone.png"), "does not exist"),
                                                      (str(tmp_path / "empty"), "folder holds no PNG, JPEG or DICOM file")]
    read, images, bad = read_inputs(files, 8)
    assert [f.name for f in read] == ["y.JPG", "x.png"] and images.shape == (2, 8, 8)
    assert images[0, 0, 0] == 200 and images[1, 0, 0] == 100
    assert [p.file for p in bad] == [str(tmp_path / "a" / "IM0001"), str(tmp_path / "a" / "notes.txt")]


def test_a_folder_that_is_not_a_finished_run_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        check_run_dir(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds no suffix.safetensors; it is not a finished run"):
        check_run_dir(tmp_path)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_test_time_views_are_the_same_in_evaluation_predict_and_export(tiny_backbone, tmp_path):
    """A head-only run averages its prediction over 4 shifted views (evaluation.views = auto): `predict` gives the
    suffix's output on the cached evaluation features of those views, and the exported model reproduces it."""
    from dataclasses import replace

    from fedtl.data.preprocess import shift_view
    from fedtl.features import compute_prefix_features
    from fedtl.data.sources import ImageSet

    images = np.random.default_rng(0).integers(0, 256, (24, 16, 16), dtype=np.uint8)  # shifts change these
    run = tiny_run(tiny_backbone, kind="none")
    assert run.views == 4 and tiny_run(tiny_backbone).views == 1  # LoRA: one view
    data = ImageSet(images, np.zeros(len(images), np.int64), "toy")
    feats = torch.stack([compute_prefix_features(run.model, replace(run.preprocessing, view=k), data)
                         for k in range(4)], 1)  # what evaluation scores
    with torch.no_grad():
        expected = run.model.suffix(feats).softmax(-1).numpy()
    probs = run.probabilities(images)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    single = tiny_run(tiny_backbone, kind="none", views=1).probabilities(images)
    assert np.abs(probs - single).max() > 1e-4  # the views change the prediction
    # view k shifts by round(16 / 14) = 1 pixel, edges repeated
    x = torch.arange(16.0).view(1, 1, 1, 16).expand(1, 1, 16, 16)
    assert torch.equal(shift_view(x, 2)[0, 0, 0], torch.cat([torch.zeros(1), torch.arange(15.0)]))
    assert torch.equal(shift_view(x, 0), x)
    assert "view" not in run.preprocessing.key()  # view 0 keeps the cache entries made before views existed
    report = export_run(run, "torchscript", tmp_path / "v.pt", images, latency_runs=1)
    assert report.max_abs_diff <= 1e-4 and report.labels_agree == len(images)
    extra = {"fedtl.views": ""}
    torch.jit.load(str(tmp_path / "v.pt"), _extra_files=extra)
    assert extra["fedtl.views"] == b"4"


def test_a_run_with_class_names_predicts_and_exports_them(tiny_backbone, toy_images):
    import dataclasses

    from fedtl.export import metadata
    from fedtl.inference import predict_images

    images = toy_images[0][:6]
    run = tiny_run(tiny_backbone, kind="none")
    rows = predict_images(run, [f"x{i}.png" for i in range(6)], images, []).csv_rows()
    assert rows[0] == ["file", "prob_0", "prob_1", "label"]  # no names: the classes stay numbered
    assert json.loads(metadata(run)["fedtl.classes"]) == ["0", "1"]
    named = dataclasses.replace(run, config=run.config.with_overrides({"model.class-names": "normal,pneumonia"}))
    rows = predict_images(named, [f"x{i}.png" for i in range(6)], images, []).csv_rows()
    assert rows[0] == ["file", "prob_0", "prob_1", "label", "label_name"]
    assert all(r[4] == ("normal", "pneumonia")[int(r[3])] for r in rows[1:])
    assert json.loads(metadata(named)["fedtl.classes"]) == ["normal", "pneumonia"]
