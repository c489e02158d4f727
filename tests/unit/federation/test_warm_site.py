"""A deployed site whose prefix features are cached trains without the backbone.

The ClientApp runs in a fresh process per message (Flower's SuperNode starts one), so what it imports and
builds is paid every round. A warm site (features cached, head-only suffix) builds only the suffix and
imports no backbone library (timm, torchvision.models), no PEFT and no scikit-learn; every check of the cold
path still holds there: the server's pinned weights hash against the site's, the label range, the server's
suffix against the expected names and shapes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import tomli_w

from fedtl.config import AdaptersConfig, ModelConfig, TrainConfig
from fedtl.model import SuffixModel, TransferModel
from fedtl.training import DPSettings, train_suffix
from tests.conftest import write_small_medmnist

ROOT = Path(__file__).resolve().parents[3]
BACKBONE_LIBRARIES = ("timm", "torchvision.models", "peft", "sklearn")


@pytest.mark.parametrize("cfg", [ModelConfig(cut_after="b2"), ModelConfig(cut_after="b2", head="mlp", head_hidden=8),
                                 ModelConfig(cut_after="b2", feature_norm="layernorm")])
def test_the_suffix_model_is_the_transfer_model_s_suffix(tiny_backbone, cfg):
    """Same names, shapes and initial values; the same DP training on the same features gives the same tensors."""
    full = TransferModel(tiny_backbone, 3, cfg, AdaptersConfig(kind="none"), seed=5)
    feats = full.prefix_features(torch.randn(24, 3, 12, 12))
    alone = SuffixModel("tiny", full.weights_sha256, full.split_name, feats.shape[1], 3, cfg, seed=5)
    assert alone.expected_state() == full.expected_state()
    assert all(torch.equal(a, b) for a, b in zip(alone.trainable_state().values(), full.trainable_state().values()))
    labels = torch.randint(0, 3, (24,))
    dp = DPSettings(noise_multiplier=0.7, max_grad_norm=1.0, sample_rate=8 / 24)
    for model in (full, alone):
        gen = torch.Generator().manual_seed(11)
        train_suffix(model, feats, labels, TrainConfig(lr=0.3, batch_size=8, epochs=2), dp=dp, generator=gen,
                     reseed=False)
    for (name, a), (_, b) in zip(alone.trainable_state().items(), full.trainable_state().items()):
        assert torch.allclose(a, b, atol=1e-6), name


# ---- the real ClientApp in a fresh process, as a SuperNode runs it ---------------------------------------------
_CALL = textwrap.dedent('''
    import json, sys, time
    t0 = time.perf_counter()
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
    from safetensors.torch import load_file
    import clients.app
    request = json.loads(sys.argv[1])
    arrays = ArrayRecord({k: v for k, v in load_file(request.pop("arrays")).items()})
    site = request.pop("site")
    meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
                    created_at=0.0, ttl=600.0, message_type=MessageType.TRAIN)
    msg = Message(content=RecordDict({"config": ConfigRecord(request), "arrays": arrays}), metadata=meta)
    context = Context(run_id=1, node_id=7, node_config={"site-config": site}, state=RecordDict(), run_config={})
    reply = clients.app.app(msg, context)
    print(json.dumps({
        "imported": sorted(m for m in %r if m in sys.modules),
        "metrics": dict(reply.content["metrics"]), "reason": reply.content["info"]["reason"],
        "shapes": {k: list(v.shape) for k, v in reply.content["arrays"].items()},
        "seconds": time.perf_counter() - t0}))
''' % (BACKBONE_LIBRARIES,))


def _call(site: Path, arrays: Path, **config) -> dict:
    request = {"site": str(site), "arrays": str(arrays), "num-classes": 2, "total-rounds": 4, "run-id": "r1",
               **config}
    out = subprocess.run([sys.executable, "-c", _CALL, json.dumps(request)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_warm_site_trains_without_building_or_importing_the_backbone(tmp_path):
    from safetensors.torch import save_file

    from fedtl.backbones.efficientnet import LITE0_SHA256
    from fedtl.config import FedTLConfig
    from fedtl.federation.site import build_transfer_model

    images = write_small_medmnist(tmp_path / "images.npz", n_train=48, n_val=4, n_test=4, seed=1)
    site = tmp_path / "site.toml"
    site.write_text(tomli_w.dumps({"name": "st-mary", "state-dir": str(tmp_path / "state"),
                                   "data": {"format": "medmnist", "path": str(images), "image-size": 28},
                                   "privacy": {"target-epsilon": 3.0, "delta": 1e-5}}))
    suffix = build_transfer_model(FedTLConfig(), 2).trainable_state()  # the server's initial suffix
    arrays = tmp_path / "suffix.safetensors"
    save_file(dict(suffix), str(arrays))
    expected = {k: list(v.shape) for k, v in suffix.items()}

    cold = _call(site, arrays, **{"server-round": 1, "backbone-sha256": LITE0_SHA256})
    assert cold["metrics"]["declined"] == 0, cold
    assert "timm" in cold["imported"]  # a cold site builds the backbone once and caches its features
    assert any((tmp_path / "state" / "features").iterdir())

    warm = _call(site, arrays, **{"server-round": 2, "backbone-sha256": LITE0_SHA256})
    assert warm["metrics"]["declined"] == 0 and warm["metrics"]["epsilon"] > cold["metrics"]["epsilon"], warm
    assert warm["shapes"] == expected
    assert warm["imported"] == [], warm  # no timm, torchvision.models, PEFT or scikit-learn
    ledger = json.loads((tmp_path / "state" / "privacy-ledger.json").read_text())
    assert [e["round"] for e in ledger["entries"]] == [1, 2]

    # the checks of the cold path hold on the warm one: another pinned hash, a suffix of another shape
    other_pin = _call(site, arrays, **{"server-round": 3, "backbone-sha256": "1" * 64})
    assert other_pin["metrics"]["declined"] == 1 and "the server pinned 1111111111111111" in other_pin["reason"]
    bad = tmp_path / "bad.safetensors"
    save_file({k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in suffix.items()}, str(bad))
    wrong_shape = _call(site, bad, **{"server-round": 3, "backbone-sha256": LITE0_SHA256})
    assert wrong_shape["metrics"]["declined"] == 1 and "do not match the model" in wrong_shape["reason"]
    three_classes = _call(site, arrays, **{"server-round": 3, "backbone-sha256": LITE0_SHA256, "num-classes": 3})
    assert three_classes["metrics"]["declined"] == 1  # the 2-class suffix does not fit a 3-class model
    for reply in (other_pin, wrong_shape, three_classes):
        assert reply["imported"] == [], reply
    ledger = json.loads((tmp_path / "state" / "privacy-ledger.json").read_text())
    assert [e["round"] for e in ledger["entries"]] == [1, 2]  # refused requests spent nothing
