"""One self-contained model file from a finished run: ONNX or TorchScript, checked before it is kept.

    input  ``image``          float32 (N, 3, R, R), values in [0, 1], R = the run's ``model.resolution``;
                              a grayscale image is its one channel repeated three times (as training does)
    output ``probabilities``  float32 (N, C), softmax over the classes
    output ``label``          int64 (N,), the run's decision rule (``fedtl.decision``; argmax when none)

Inside: the backbone's normalization, the frozen prefix (run on each test-time view of the image, ``evaluation
.views``, when the run has them), the suffix (LoRA adapters merged into their layers; the mean probability over the
views), the softmax and the decision rule. The file's metadata (ONNX ``metadata_props``, TorchScript
extra files) carries ``fedtl.decision``, ``fedtl.input``, the backbone, its weights' sha256 and the round.

Export is checked before the file exists: the exported model (in ONNX Runtime, or the TorchScript module
loaded back) must give the probabilities of :func:`fedtl.inference.RunModel.probabilities` (what
``fedtl predict`` writes) within ``tolerance`` on the run's test images; a failed check is an error and
leaves no file behind (the model is written to a temporary file and renamed only after the check).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedtl.data.preprocess import shift_view
from fedtl.decision import METADATA_KEY
from fedtl.errors import ConfigError, FedTLError
from fedtl.inference import RunModel

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4


class ExportError(FedTLError):
    """The exported model could not be written, or it does not reproduce ``fedtl predict``."""

    exit_code = 5


class ExportedModel(nn.Module):
    """[0, 1] images → (probabilities, label): normalization, prefix, suffix, softmax, decision rule."""

    def __init__(self, run: RunModel):
        super().__init__()
        model = copy.deepcopy(run.model).eval()
        merge_lora(model)
        self.prefix = model.prefix
        self.prefix_pool = model.prefix_pool
        self.suffix = model.suffix
        self.register_buffer("mean", torch.tensor(run.preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(run.preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.views, self.size = run.views, (run.resolution, run.resolution)  # test-time views, as predict
        d = run.decision
        self.threshold_rule = d.rule == "threshold"
        self.positive_class = int(d.positive_class)
        self.threshold = float(d.threshold)
        self.bias_rule = d.rule == "bias"  # argmax of log P + bias (the same as of logits + bias)
        self.register_buffer("bias", torch.tensor(d.bias if self.bias_rule else (), dtype=torch.float32))
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.views <= 1:
            feats = self.prefix_pool(self.prefix((image - self.mean) / self.std))  # (N, 3, R, R) -> (N, D)
        else:  # the mean prediction over the shifted views (N, K, D), as `fedtl predict` and the run's evaluation
            feats = torch.stack([self.prefix_pool(self.prefix((shift_view(image, k, self.size) - self.mean) / self.std))
                                 for k in range(self.views)], 1)
        logits = self.suffix(feats)
        probs = logits.softmax(-1)  # (N, C)
        if self.bias_rule:
            label = (logits.log_softmax(-1) + self.bias).argmax(-1)
        elif self.threshold_rule:
            positive = probs[:, self.positive_class] >= self.threshold
            label = torch.where(positive, torch.full_like(positive, self.positive_class, dtype=torch.int64),
                                torch.full_like(positive, 1 - self.positive_class, dtype=torch.int64))
        else:
            label = probs.argmax(-1)
        return probs, label


def merge_lora(module: nn.Module) -> int:
    """Fold every PEFT LoRA layer of ``module`` into its base layer and put the base layer in its place (in place).

    Returns the number of layers merged; the module computes the same function without PEFT's wrappers.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency; without it there can be no LoRA layer either
        return 0
    merged = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge(safe_merge=True)
                setattr(parent, name, child.get_base_layer())
                merged += 1
    return merged


def metadata(run: RunModel) -> dict[str, str]:
    r = run.resolution
    return {
        METADATA_KEY: json.dumps(run.decision.to_dict(), sort_keys=True),
        "fedtl.input": f"image: float32 (N, 3, {r}, {r}), values in [0, 1], grayscale repeated to 3 channels",
        "fedtl.outputs": f"probabilities: float32 (N, {run.num_classes}); label: int64 (N,) by fedtl.decision",
        "fedtl.backbone": run.config.model.backbone,
        "fedtl.weights_sha256": run.metadata.get("weights_sha256", ""),
        "fedtl.round": run.metadata.get("round", ""),
        "fedtl.views": str(run.views),  # test-time views averaged inside the model
        "fedtl.classes": json.dumps(list(run.config.model.names) or [str(c) for c in range(run.num_classes)]),
        # a site's personal suffix (`fedtl export --suffix`): whose, and whether it is private in that site's data
        **({"fedtl.personal-site": run.metadata["site"], "fedtl.dp": run.metadata["dp"]}
           if "personal" in run.metadata else {}),
    }


@dataclass(frozen=True)
class ExportReport:
    path: Path
    format: str
    bytes: int
    checked_images: int
    max_abs_diff: float
    labels_agree: int
    latency_ms: float  # median CPU latency of one image (batch 1, one CPU thread)


def export_run(run: RunModel, fmt: str, out: str | Path, check_images: np.ndarray,
               tolerance: float = TOLERANCE, latency_runs: int = 30) -> ExportReport:
    """Write ``run``'s model to ``out`` as ``fmt`` after checking it on ``check_images`` (uint8 (N, H, W))."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}.")
    if len(check_images) == 0:
        raise ConfigError("Export needs at least one image to check the exported model against `fedtl predict`.")
    if fmt == "onnx":
        _require_onnx()
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name the file to write, e.g. {out / ('model.' + _ext(fmt))}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    module = ExportedModel(run)
    unit = run.preprocessing.to_unit(check_images)  # (N, 3, R, R) in [0, 1]: exactly predict's input before normalization
    expected = run.probabilities(check_images)  # what `fedtl predict` writes
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        example = torch.rand(2, 3, run.resolution, run.resolution)  # batch 2: the batch axis stays dynamic
        infer, single_thread = _write_onnx(module, example, tmp, metadata(run)) if fmt == "onnx" else \
            _write_torchscript(module, example, tmp, metadata(run))
        probs, labels = infer(unit.numpy())
        diff = float(np.max(np.abs(probs - expected))) if probs.shape == expected.shape else float("inf")
        if not diff <= tolerance:
            raise ExportError(f"The exported {fmt} model differs from `fedtl predict` by {diff:.3g} (allowed "
                              f"{tolerance:g}) on {len(unit)} test image(s); nothing was written.")
        agree = int((labels == run.decision.apply(expected)).sum())
        latency = _latency(single_thread, unit[:1].numpy(), latency_runs)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # a model file, not a secret: the usual mode, not mkstemp's 0600
        os.replace(tmp, out)
    except FedTLError:
        raise
    except Exception as exc:  # the exporters raise many types; the user gets one line and no partial file
        raise ExportError(f"Exporting to {fmt} failed ({type(exc).__name__}: {' '.join(str(exc).split())[:500]}); "
                          "nothing was written.") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(out, fmt, out.stat().st_size, len(unit), diff, agree, latency)


def _require_onnx() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"ONNX export needs {', '.join(missing)} (not installed); install them with "
                          "`pip install -e '.[export]'` (or pip install onnx onnxscript onnxruntime), or use "
                          "--format torchscript.")


def _ext(fmt: str) -> str:
    return "onnx" if fmt == "onnx" else "pt"


Infer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # (N, 3, R, R) -> (probabilities, labels)
Timed = Callable[[np.ndarray], object]  # the same model on one CPU thread, for the latency figure


def _write_onnx(module: ExportedModel, example: torch.Tensor, path: Path, meta: dict[str, str]) -> tuple[Infer, Timed]:
    import onnx
    import onnxruntime as ort

    batch = torch.export.Dim("N", min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=["image"],
                                    output_names=["probabilities", "label"],
                                    dynamic_shapes={"image": {0: batch}}, verbose=False)
    proto = program.model_proto
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def infer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, labels = session.run(["probabilities", "label"], {"image": x.astype(np.float32, copy=False)})
        return np.asarray(probs), np.asarray(labels)

    one = ort.SessionOptions()
    one.log_severity_level, one.intra_op_num_threads, one.inter_op_num_threads = 3, 1, 1
    single = ort.InferenceSession(str(path), one, providers=["CPUExecutionProvider"])
    return infer, lambda x: single.run(["probabilities"], {"image": x})


def _write_torchscript(module: ExportedModel, example: torch.Tensor, path: Path, meta: dict[str, str]
                       ) -> tuple[Infer, Timed]:
    # PyTorch 2.14 marks torch.jit deprecated (a FutureWarning per call); the user asked for TorchScript, and the
    # README says ONNX is the long-lived format, so these four calls do not repeat it.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.")
        traced = torch.jit.trace(module, (example,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files=meta)
        loaded = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.no_grad()
    def infer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, labels = loaded(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return probs.numpy(), labels.numpy()

    @torch.no_grad()
    def single_thread(x: np.ndarray) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            loaded(torch.from_numpy(x))
        finally:
            torch.set_num_threads(threads)

    return infer, single_thread


def _latency(infer: Timed, one: np.ndarray, runs: int) -> float:
    """Median wall time (ms) of one image on one CPU thread, after three warm-up calls.

    One thread: an edge device's figure, and the only one that holds on a shared machine (with two threads a
    busy neighbour makes PyTorch's OpenMP workers wait on each other: 18.7 ms became 540 ms here)."""
    for _ in range(3):
        infer(one)
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        infer(one)
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)
