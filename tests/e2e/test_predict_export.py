"""`fedtl predict` and `fedtl export` on one small real run (2 sites, 2 rounds, LoRA on the last block).

The run's own evaluation (summary.json / metrics.jsonl: the tracker's figures on the test split, at the selected
round) is the reference: predicting the same test images from PNG files must give the same probabilities.
"""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from tests.conftest import write_small_medmnist

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _fedtl(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "fedtl.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One small run and its test split written as files: 80 PNGs, one DICOM without a suffix, one corrupt PNG."""
    root = tmp_path_factory.mktemp("predict")
    data = write_small_medmnist(root / "small.npz")
    env = dict(os.environ, FEDTL_CACHE_DIR=str(root / "cache"))
    out = root / "run"
    proc = _fedtl("simulate", "--out", out, "--data", data, "--sites", 2, "--rounds", 2, "--set", "data.partitioner=iid",
                  "--set", "adapters.kind=lora", "--set", "adapters.blocks=1", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(data) as z:
        images, labels = z["test_images"], z["test_labels"].ravel()
    folder = root / "test-images"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    (folder / "notes.txt").write_text("not an image: a folder's other files are not inputs")
    _write_dicom(root / "dicom" / "IM0000", images[0])
    return {"dir": out, "images": images, "labels": labels, "folder": folder, "env": env, "root": root,
            "dicom": root / "dicom" / "IM0000"}


def _write_dicom(path, pixels):
    """An 8-bit MONOCHROME2 DICOM, no file suffix (as PACS exports are)."""
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    path.parent.mkdir(parents=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "DX", 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels, np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _read_csv(path):
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    probs = np.array([[float(r["prob_0"]), float(r["prob_1"])] for r in rows])
    return rows, probs, np.array([int(r["label"]) for r in rows])


@pytest.fixture(scope="module")
def predicted(run):
    out = run["root"] / "preds.csv"
    proc = _fedtl("predict", run["dir"], run["folder"], run["dicom"], run["root"] / "missing.png", "--image-size", 28,
                  "--out", out, env=run["env"])
    return proc, out


def test_predict_gives_the_runs_own_test_figures_and_names_what_it_skipped(run, predicted):
    proc, out = predicted
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, probs, labels = _read_csv(out)
    assert [r["file"] for r in rows] == [str(run["folder"] / f"{i:03d}.png") for i in range(80)] + [str(run["dicom"])]
    # the tracker's figures at the selected round, from the same images read as files
    summary = json.loads((run["dir"] / "summary.json").read_text())
    selected = [json.loads(x) for x in (run["dir"] / "metrics.jsonl").read_text().splitlines()][summary["selected_round"]]
    y = run["labels"]
    p = probs[:80]
    assert roc_auc_score(y, p[:, 1]) == pytest.approx(summary["test_auc"], abs=1e-9)
    # labels by the rule recorded with the suffix (argmax when none), as the tracker scores test_acc
    assert float((labels[:80] == y).mean()) == pytest.approx(summary["test_acc"], abs=1e-12)
    loss = float(-np.log(np.clip(p[np.arange(80), y], 1e-12, None)).mean())
    assert loss == pytest.approx(selected["test_loss"], abs=1e-5)  # the probabilities themselves, not only their order
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    # the DICOM holds test image 0's pixels: read through the DICOM path, the same prediction
    np.testing.assert_allclose(probs[80], probs[0], atol=1e-7)
    assert f"skipped {run['folder'] / 'corrupt.png'}: UnidentifiedImageError" in proc.stderr
    assert f"skipped {run['root'] / 'missing.png'}: does not exist" in proc.stderr
    assert "notes.txt" not in proc.stderr + out.read_text()
    assert "Traceback" not in proc.stderr and "predicted 81 file(s), skipped 2" in proc.stderr


def test_predict_with_nothing_readable_fails_with_a_clear_message(run, capsys):
    from fedtl.cli import main

    assert main(["predict", str(run["dir"]), str(run["folder"] / "corrupt.png"), str(run["root"] / "gone")]) == 3
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[-1] == "error: no file could be predicted (2 unreadable or missing, named above)."
    assert f"skipped {run['folder'] / 'corrupt.png'}: UnidentifiedImageError" in err


def test_onnx_export_matches_predict_and_carries_the_decision_rule(run, predicted, capsys):
    import onnx
    import onnxruntime as ort

    from fedtl.cli import main
    from fedtl.decision import Decision

    # a calibrated rule recorded by the run (as calibration writes it) must reach predict and the exported model
    calibrated = run["root"] / "run-calibrated"
    shutil.copytree(run["dir"], calibrated)
    _, probs, _ = _read_csv(predicted[1])
    threshold = float(np.median(probs[:80, 1]))  # half the images on each side: the rule visibly changes labels
    _set_decision(calibrated / "suffix.safetensors", Decision("threshold", threshold, 1))
    preds = run["root"] / "preds-calibrated.csv"
    assert main(["predict", str(calibrated), str(run["folder"]), "--image-size", "28", "--out", str(preds)]) == 0
    assert f"decision: class 1 iff P(class 1) >= {threshold:g}" in capsys.readouterr().err
    _, cal_probs, cal_labels = _read_csv(preds)
    np.testing.assert_array_equal(cal_probs, probs[:80])
    np.testing.assert_array_equal(cal_labels, (cal_probs[:, 1] >= threshold).astype(int))
    assert 0 < cal_labels.sum() < 80

    model = run["root"] / "model.onnx"
    proc = _fedtl("export", calibrated, "--format", "onnx", "--out", model, env=run["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CPU latency:" in proc.stdout and "max |difference| to `fedtl predict`" in proc.stdout
    meta = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert json.loads(meta["fedtl.decision"]) == {"rule": "threshold", "positive-class": 1, "threshold": threshold}
    # independently of the export's own check: ONNX Runtime on the PNG files' pixels, [0, 1], 3 channels, 112 px
    from fedtl.inference import load_run

    unit = load_run(calibrated).preprocessing.to_unit(run["images"]).numpy()
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    onnx_probs, onnx_labels = session.run(["probabilities", "label"], {"image": unit})
    assert np.abs(onnx_probs - cal_probs).max() <= 1e-4
    np.testing.assert_array_equal(onnx_labels, cal_labels)


def _set_decision(path, decision):
    from safetensors.torch import safe_open, save_file

    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}
    save_file(tensors, str(path), metadata={**meta, **decision.to_metadata()})


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_and_a_failed_check_leaves_no_file(run):
    import torch

    from fedtl.export import ExportError, export_run
    from fedtl.inference import load_run

    model = load_run(run["dir"])
    lora_b = [p for n, p in model.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(bool(p.abs().sum() > 0) for p in lora_b)  # trained adapters: merging them changes weights
    images = run["images"][:16]
    out = run["root"] / "exported" / "model.pt"
    report = export_run(model, "torchscript", out, images, latency_runs=3)
    assert report.max_abs_diff <= 1e-4 and report.labels_agree == 16 and out.stat().st_size == report.bytes
    scripted = torch.jit.load(str(out))
    probs, labels = scripted(model.preprocessing.to_unit(images))
    np.testing.assert_allclose(probs.numpy(), model.probabilities(images), atol=1e-4)
    assert not any("lora" in n for n, _ in scripted.named_parameters())  # merged into the base layers

    failed = run["root"] / "exported" / "strict.pt"
    with pytest.raises(ExportError, match="differs from `fedtl predict`.*nothing was written"):
        export_run(model, "torchscript", failed, images, tolerance=-1.0, latency_runs=1)  # no model can pass
    assert sorted(p.name for p in failed.parent.iterdir()) == ["model.pt"]  # no partial or temporary file


def test_a_run_pinned_to_other_weights_is_refused(run, capsys):
    """The backbone's sha256 is checked against the run's pin before anything is predicted."""
    from safetensors.torch import safe_open, save_file

    from fedtl.cli import main

    other = run["root"] / "run-other-weights"
    shutil.copytree(run["dir"], other)
    with safe_open(str(other / "suffix.safetensors"), framework="pt") as fh:
        meta, tensors = dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}
    save_file(tensors, str(other / "suffix.safetensors"), metadata={**meta, "weights_sha256": "ab" * 32})
    assert main(["predict", str(other), str(run["folder"] / "000.png"), "--image-size", "28"]) == 5
    out, err = capsys.readouterr()
    assert out == "" and "but the run pinned abababababababab…: a different prefix" in err



def test_predict_with_a_sites_personal_suffix_names_it_and_refuses_another_runs(run, capsys):
    """`fedtl predict --suffix`: a site's personal-suffix.safetensors of this run replaces the run's suffix (with the
    site's own decision rule); one fine-tuned from another run is refused before anything is predicted."""
    from safetensors.torch import safe_open, save_file

    from fedtl.cli import main
    from fedtl.decision import Decision

    with safe_open(str(run["dir"] / "suffix.safetensors"), framework="pt") as fh:
        meta, tensors = dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}
    assert meta["run"]  # the run's id, which a site's personal suffix names
    personal = run["root"] / "personal-suffix.safetensors"
    save_file(tensors, str(personal), metadata={
        "run": meta["run"], "site": "st-mary", "kept": "tuned", "dp": "false", "weights_sha256": meta["weights_sha256"],
        **Decision("threshold", 0.0, 1, "the site's validation split (9 images)").to_metadata()})
    out = run["root"] / "preds-personal.csv"
    assert main(["predict", str(run["dir"]), str(run["folder"]), "--image-size", "28", "--suffix", str(personal),
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "personal suffix of site st-mary (its fine-tuned suffix; trained without DP" in err
    assert "(chosen on the site's validation split (9 images))" in err
    _, _, labels = _read_csv(out)
    assert (labels == 1).all()  # the site's rule (threshold 0), not the run's argmax
    save_file(tensors, str(personal), metadata={"run": "another-run", "kept": "global"})
    assert main(["predict", str(run["dir"]), str(run["folder"] / "000.png"), "--image-size", "28",
                 "--suffix", str(personal)]) == 2
    assert "was fine-tuned from run `another-run`" in capsys.readouterr().err
