"""`fedtl site check`: a site's config and data, checked offline, with every unreadable file named."""

import numpy as np
import pytest
from PIL import Image

from fedtl.cli import main


@pytest.fixture(autouse=True)
def _own_weights_dir(monkeypatch):
    """`site check` looks up the site's own weights first (it sets FEDTL_WEIGHTS_DIR, as a site does); restored after."""
    monkeypatch.delenv("FEDTL_WEIGHTS_DIR", raising=False)


@pytest.fixture
def site(tmp_path):
    """Two normal and one pneumonia image, one corrupt PNG, one listed but missing; the site file names them."""
    images = tmp_path / "images"
    images.mkdir()
    for name, value in (("n1.png", 10), ("n2.jpg", 30), ("p1.png", 220)):
        Image.fromarray(np.full((12, 12), value, np.uint8)).save(images / name)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "labels.csv").write_text(
        "file,label\nn1.png,normal\nbroken.png,pneumonia\nn2.jpg,normal\ngone.png,normal\np1.png,pneumonia\n")
    conf = tmp_path / "site.toml"
    conf.write_text('name = "st-mary"\n[data]\nformat = "folder"\npath = "images"\nlabels = "labels.csv"\n'
                    'image-size = 16\nclasses = ["normal", "pneumonia"]\n')
    return conf


def _run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def test_unreadable_files_exit_3_unless_allowed_and_are_always_named(site, capsys):
    code, out, err = _run(capsys, ["site", "check", str(site)])
    assert code == 3 and "unreadable: 2" in out and "  gone.png: file does not exist" in out
    assert err[-1] == ("error: 2 of 5 listed entries are unreadable (named above); fix them or remove them from the "
                       "labels CSV, or pass --allow-bad to accept a site that skips them.")
    assert not (site.parent / "state").exists()
    (site.parent / "labels.csv").write_text("file,label\nn1.png,normal\np1.png,pneumonia\n")
    code, out, err = _run(capsys, ["site", "check", str(site)])
    assert code == 0 and err == [] and "unreadable: 0" in out


def test_good_site_reports_counts_and_unreadable_files(site, capsys):
    code, out, err = _run(capsys, ["site", "check", "--allow-bad", str(site)])
    assert code == 0 and not [line for line in err if line.startswith("error:")]
    assert "site: st-mary" in out
    assert "images read: 3 of 5 listed, 16x16 grayscale" in out
    assert "class 0 normal: 2" in out and "class 1 pneumonia: 1" in out
    assert "unreadable: 2" in out
    assert "  gone.png: file does not exist" in out
    assert "  broken.png: " in out
    assert out.index("broken.png:") < out.index("gone.png:")  # in CSV order


def test_missing_configured_file_exits_3(site, capsys):
    site.write_text(site.read_text().replace("[data]", '[tls]\nca-cert = "certs/ca.pem"\n[data]'))
    code, out, err = _run(capsys, ["site", "check", "--allow-bad", str(site)])
    assert code == 3
    assert "missing file: `tls.ca-cert` = " in out and "images read: 3" in out
    assert err[-1].startswith("error: 1 configured file(s) do not exist (`tls.ca-cert`)")


def test_no_readable_image_exits_3_and_still_names_every_file(site, capsys):
    (site.parent / "labels.csv").write_text("file,label\nbroken.png,normal\ngone.png,pneumonia\n")
    code, out, err = _run(capsys, ["site", "check", str(site)])
    assert code == 3
    assert "images read: 0 of 2 listed" in out and "  broken.png: " in out and "  gone.png: file does not exist" in out
    assert err[-1].startswith("error: no image could be read")


def test_missing_labels_csv_exits_3_with_one_line(site, capsys):
    (site.parent / "labels.csv").unlink()
    code, _, err = _run(capsys, ["site", "check", str(site)])
    assert code == 3
    assert err[-1].startswith("error: Labels file ") and "`data.labels`" in err[-1]


@pytest.mark.parametrize("old,new,fragment", [
    ('name = "st-mary"', 'name = "st mary"', "`name` must be 1-64 characters"),
    ('format = "folder"', 'format = "dicom"\nformt = "x"', "Unknown key `data.formt`"),
    ("image-size = 16", "image-size = 5000", "`data.image-size` must be 0 (automatic) or an integer between 8 and 4096 pixels, got 5000"),
])
def test_config_problems_exit_2_with_one_error_line(site, capsys, old, new, fragment):
    site.write_text(site.read_text().replace(old, new))
    code, out, err = _run(capsys, ["site", "check", str(site)])
    assert code == 2 and out == ""
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0] and "site.toml" in err[0]


def test_site_needs_a_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["site"])
    assert exc.value.code == 2


def test_an_oversized_image_is_named_with_the_limit_and_fails_the_check(site, capsys):
    from tests.unit.data.test_decompression_bombs import png_bomb

    png_bomb(site.parent / "images" / "bomb.png", 3000, 2000)  # 6 Mpx from a few KB
    (site.parent / "labels.csv").write_text("file,label\nn1.png,normal\nbomb.png,pneumonia\np1.png,pneumonia\n")
    site.write_text(site.read_text().replace("image-size = 16", "image-size = 16\nmax-pixels = 5000000"))
    code, out, err = _run(capsys, ["site", "check", str(site)])
    assert code == 3 and "images read: 2 of 3 listed" in out
    assert "  bomb.png: ImageTooLarge: image is 3000x2000 = 6.0 Mpx, above data.max-pixels = 5.0 Mpx; not decoded" in out
    assert err[-1].startswith("error: 1 of 3 listed entries are unreadable")
    assert not (site.parent / "state").exists()  # no ledger, cache or weights folder appears


def test_a_deflated_dicom_bomb_is_named_and_fails_the_check(tmp_path, capsys):
    import numpy as np
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from tests.unit.data.test_decompression_bombs import dicom_file

    dicom_file(tmp_path / "ok.dcm", 8, 8, pixels=np.arange(64).reshape(8, 8) * 60)
    dicom_file(tmp_path / "bomb.dcm", 3000, 3000, syntax=DeflatedExplicitVRLittleEndian)  # 18 MB from ~20 KB
    (tmp_path / "labels.csv").write_text("file,label\nok.dcm,0\nbomb.dcm,1\n")
    conf = tmp_path / "site.toml"
    conf.write_text('name = "st-mary"\n[data]\nformat = "dicom"\npath = "."\nlabels = "labels.csv"\n'
                    "image-size = 8\nmax-pixels = 5000000\n")
    code, out, err = _run(capsys, ["site", "check", str(conf)])
    assert code == 3 and "images read: 1 of 2 listed" in out
    assert "  bomb.dcm: ImageTooLarge: image is 3000x3000 = 9.0 Mpx, above data.max-pixels = 5.0 Mpx" in out
    assert err[-1].startswith("error: 1 of 2 listed entries are unreadable")
    assert not (tmp_path / "state").exists()


def test_the_evaluation_set_is_counted_per_split_and_a_missing_class_is_named(site, capsys):
    """[evaluation]: what goes to validation and test per class (the site's own stratified split), a class a split
    will lack named as a warning, unreadable evaluation files named and failing the check; nothing is written."""
    folder = site.parent / "eval"
    folder.mkdir()
    for name, value in (("a.png", 10), ("b.png", 20), ("c.png", 30), ("d.png", 40), ("e.png", 220)):
        Image.fromarray(np.full((12, 12), value, np.uint8)).save(folder / name)
    (folder / "bad.png").write_bytes(b"not a png")
    (site.parent / "eval.csv").write_text("file,label\na.png,normal\nb.png,normal\nc.png,normal\nd.png,normal\n"
                                          "e.png,pneumonia\nbad.png,normal\n")
    (site.parent / "labels.csv").write_text("file,label\nn1.png,normal\np1.png,pneumonia\n")
    base = site.read_text()
    site.write_text(base + '[evaluation]\nformat = "folder"\npath = "eval"\nlabels = "eval.csv"\nimage-size = 16\n'
                    'classes = ["normal", "pneumonia"]\n')
    code, out, err = _run(capsys, ["site", "check", str(site)])
    assert "evaluation: folder" in out and "5 of 6 listed images read" in out
    assert "class 0 normal: 2 validation, 2 test" in out and "class 1 pneumonia: 0 validation, 1 test" in out
    assert "warning: the validation split will hold no image of class 1 pneumonia: its AUC is undefined there" in out
    # too few validation images to ever keep a personal suffix: said before the run, not discovered after it
    assert "note: personalization would keep the global suffix here" in out and "(fewer of class 0 normal)" in out
    assert "  bad.png: " in out and code == 3
    assert err[-1].startswith("error: 1 entries of the evaluation set are unreadable (named above)")
    assert _run(capsys, ["site", "check", "--allow-bad", str(site)])[0] == 0
    # held out of [data]: the same split the site would make, counted without writing it
    site.write_text(base + "[evaluation]\nholdout = 0.5\n")
    code, out, _ = _run(capsys, ["site", "check", str(site)])
    assert code == 0 and "evaluation: 50% of [data] held out of training: 0 images" in out  # one image per class
    assert "; the score histograms (binary) or prediction rows (multi-class)" in out
    assert "the feature statistics of these images (sent with at least 20; it holds only 0)" in out
    assert "warning: the validation split will hold no image of class 0 normal, 1 pneumonia: its AUC is undefined" in out
    site.write_text(base + "[evaluation]\nholdout = 0.5\nrelease-scores = false\n[privacy]\nmax-personalize-epochs = 0\n")
    out = _run(capsys, ["site", "check", str(site)])[1]
    assert "note: personalization" not in out  # the site never personalizes
    assert "not the score histograms or prediction rows (release-scores = false)" in out
    assert "not the feature statistics (release-statistics = false)" in out  # following release-scores
    site.write_text(base + "[evaluation]\nholdout = 0.5\nrelease-scores = false\nrelease-statistics = true\n")
    out = _run(capsys, ["site", "check", str(site)])[1]
    assert "not the score histograms" in out and "to a server without data, the feature statistics" in out
    site.write_text(base + '[evaluation]\nholdout = 0.5\nrelease-statistics = "yes"\n')
    code, _, err = _run(capsys, ["site", "check", str(site)])
    assert code != 0 and "evaluation.release-statistics" in err[-1] and "true or false" in err[-1]
    site.write_text(base + "[evaluation]\nenabled = false\n")
    assert "evaluation: none" in _run(capsys, ["site", "check", str(site)])[1]
    assert not (site.parent / "state").exists()


# ---- the site's privacy plan (`fedtl site check` plans a run from site.toml and the ledger alone) -----------------

def _plan_site(tmp_path, n, privacy=""):
    from fedtl.data.sources import write_medmnist_sample

    write_medmnist_sample(tmp_path / "d.npz", n, 10, 10, seed=1)
    conf = tmp_path / "site.toml"
    conf.write_text(f'name = "st-mary"\nstate-dir = "state"\n[data]\nformat = "medmnist"\npath = "d.npz"\n'
                    f'[privacy]\n{privacy}')
    return conf


@pytest.fixture
def suffix_params(monkeypatch):
    """The default suffix's d without building the backbone (its weights need not be on a test machine)."""
    import fedtl.federation.deployment as deployment
    import fedtl.federation.site as site_module

    class Counted:
        def param_counts(self):
            return {"trainable_params": 1346}

    monkeypatch.setattr(deployment, "local_backbone_sha256", lambda name: "f" * 64)
    monkeypatch.setattr(site_module, "build_transfer_model", lambda cfg, k: Counted())


def _sigma(out):
    import re

    return float(re.search(r"σ = ([0-9.]+),", out).group(1))


def test_site_check_plans_the_sigma_the_site_will_calibrate_and_writes_no_ledger(tmp_path, capsys, suffix_params):
    from fedtl.privacy import PrivacyLedger, Proposal, plan_round
    from fedtl.privacy.policy import policy_for_site
    from fedtl.site_config import SiteConfig

    conf = _plan_site(tmp_path, 300)
    code, out, _ = _run(capsys, ["site", "check", str(conf), "--rounds", "20", "--batch-size", "32"])
    assert code == 0
    assert "privacy plan for a run of 20 rounds, batch 32" in out and "300 training images" in out
    assert "  class 0: " in out and "  class 1: " in out  # integer labels, no names: not "class 0 0"
    policy = policy_for_site(SiteConfig.load(conf))
    expected = plan_round(policy, PrivacyLedger("st-mary", 1e-5, "rdp"), Proposal(20, 32), run_id="x", server_round=1,
                          num_examples=300)
    assert _sigma(out) == pytest.approx(expected.noise_multiplier, abs=0.005)
    from fedtl.planning import nsr

    ratio = nsr(expected.noise_multiplier, 1346, expected.sample_rate * 300, expected.steps)
    assert f"(d = 1346): NSR {ratio:.2f} per round, {ratio / 20 ** 0.5:.2f} over the run: noisy" in out  # 0.90, 0.20
    assert not (tmp_path / "state").exists()  # a check writes nothing: no ledger, no state dir


def test_site_check_plans_with_what_the_ledger_has_spent_and_leaves_it_unchanged(tmp_path, capsys, suffix_params):
    from fedtl.privacy import open_ledger

    conf = _plan_site(tmp_path, 300)
    _, fresh, _ = _run(capsys, ["site", "check", str(conf)])
    path = tmp_path / "state" / "privacy-ledger.json"
    with open_ledger(path, site="st-mary", delta=1e-5, accountant="rdp") as led:
        led.append(run="earlier", round=1, noise_multiplier=2.0, sample_rate=0.1, steps=20)
        led.save()
    before = path.read_bytes()
    code, out, _ = _run(capsys, ["site", "check", str(conf)])
    assert code == 0 and path.read_bytes() == before
    spent = float(out.split("rdp), ")[1].split(" spent")[0])
    assert spent == pytest.approx(1.227, abs=0.005)  # epsilon_of([(2.0, 0.1, 20)], 1e-5, "rdp")
    assert _sigma(out) > _sigma(fresh)  # less budget left: more noise for the same run


def test_site_check_says_when_a_small_site_would_decline_or_send_noise_and_what_would_help(tmp_path, capsys,
                                                                                            suffix_params):
    conf = _plan_site(tmp_path, 40, "target-epsilon = 0.05\n")
    code, out, _ = _run(capsys, ["site", "check", str(conf)])
    assert code == 0  # advice, not an error: the data is fine
    assert "the site would decline: Site `st-mary` would need noise multiplier" in out
    conf = _plan_site(tmp_path, 40, "target-epsilon = 1\n")
    code, out, _ = _run(capsys, ["site", "check", str(conf)])
    assert code == 0 and ": noise" in out and "! this site's updates would be mostly noise" in out
    assert "    - twice the budget (ε=2): run NSR" in out


def test_site_check_without_the_backbone_gives_sigma_but_no_nsr(tmp_path, capsys, monkeypatch):
    import fedtl.federation.deployment as deployment

    monkeypatch.setattr(deployment, "local_backbone_sha256", lambda name: "")
    code, out, _ = _run(capsys, ["site", "check", str(_plan_site(tmp_path, 300))])
    assert code == 0 and _sigma(out) > 0 and "NSR: unknown until the backbone's weights are at this site" in out


def test_site_check_refuses_a_tampered_ledger_and_a_bad_schedule(tmp_path, capsys, suffix_params):
    from tests.unit.test_cli_ledger import write_tampered_ledger

    conf = _plan_site(tmp_path, 300)
    write_tampered_ledger(tmp_path / "state" / "privacy-ledger.json")
    code, _, err = _run(capsys, ["site", "check", str(conf)])
    assert code == 4 and "integrity check" in err[-1]
    code, _, err = _run(capsys, ["site", "check", str(conf), "--batch-size", "0"])
    assert code == 2 and err[-1] == "error: --batch-size must be a positive integer, got 0."


def test_site_check_names_a_ledger_the_site_could_not_train_with(tmp_path, capsys, suffix_params):
    from fedtl.privacy import open_ledger

    conf = _plan_site(tmp_path, 300, "delta = 1e-6\n")
    with open_ledger(tmp_path / "state" / "privacy-ledger.json", site="st-mary", delta=1e-5, accountant="rdp") as led:
        led.append(run="r", round=1, noise_multiplier=2.0, sample_rate=0.25, steps=4)
        led.save()
    code, _, err = _run(capsys, ["site", "check", str(conf)])
    assert code == 4 and "accounts at δ=1e-05; the site's policy says δ=1e-06" in err[-1]



def test_site_check_plans_for_the_images_left_after_the_hold_out(tmp_path, capsys, suffix_params):
    conf = _plan_site(tmp_path, 300)
    conf.write_text(conf.read_text().replace("[privacy]\n", "[evaluation]\nholdout = 0.25\n[privacy]\n"))
    code, out, _ = _run(capsys, ["site", "check", str(conf)])
    import re

    held = int(re.search(r"held out of training: (\d+) images", out).group(1))
    training = int(re.search(r"(\d+) training images", out).group(1))
    assert code == 0 and 70 <= held <= 80 and held + training == 300  # the plan counts what the site trains on


@pytest.mark.slow
def test_site_check_says_whether_the_first_round_will_find_the_feature_cache(tmp_path, capsys):
    """Cold, then after the site worker's warm-up: the counts of built entries, read from file names alone."""
    from fedtl.federation import deployment
    from fedtl.federation.worker import SiteWorker

    conf = _plan_site(tmp_path, 40)
    conf.write_text(conf.read_text().replace("[privacy]\n", "[evaluation]\nholdout = 0.25\n[privacy]\n"))
    code, out, _ = _run(capsys, ["site", "check", str(conf)])
    assert code == 0 and not (tmp_path / "state").exists()
    assert ("feature cache for the default run's settings (112 px, avg-std-grid): training views 0 of 4 (40 images), "
            "test-time views 0 of 4; `fedtl-site start` builds the rest") in out
    for cached in (deployment.load_site_config, deployment._site_images, deployment._held_out_images):
        cached.cache_clear()
    SiteWorker(conf).warm_up()
    files = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "state").rglob("*"))
    code, out, _ = _run(capsys, ["site", "check", str(conf)])
    assert code == 0 and "training views 4 of 4 (40 images), test-time views 4 of 4; the first round reads them" in out
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "state").rglob("*")) == files  # read only


def test_site_check_plans_with_the_head_its_data_declare(tmp_path, capsys, monkeypatch):
    """A site holding a file MedMNIST declares graded (RetinaMNIST's name and 5 classes) plans the ordinal head the
    server will choose for it (677 parameters there, not the linear head's 3,365); any other file the linear head."""
    import numpy as np

    import fedtl.federation.deployment as deployment
    import fedtl.federation.site as site_module

    heads = []

    class Counted:
        def param_counts(self):
            return {"trainable_params": 677}

    monkeypatch.setattr(deployment, "local_backbone_sha256", lambda name: "f" * 64)
    monkeypatch.setattr(site_module, "build_transfer_model", lambda cfg, k: heads.append((cfg.model.head, k)) or Counted())
    rng = np.random.default_rng(0)
    arrays = {f"{s}_{kind}": (rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8) if kind == "images" else
                              np.arange(n).reshape(-1, 1) % 5)
              for s, n in (("train", 100), ("val", 10), ("test", 10)) for kind in ("images", "labels")}
    for name, head in (("retinamnist.npz", "ordinal"), ("fundus.npz", "linear")):
        np.savez(tmp_path / name, **arrays)
        conf = tmp_path / f"{name}.toml"
        conf.write_text(f'name = "st-mary"\nstate-dir = "state"\n[data]\nformat = "medmnist"\npath = "{name}"\n')
        code, _, err = _run(capsys, ["site", "check", str(conf)])
        assert code == 0, err
        assert heads[-1] == (head, 5), name


def test_site_check_plans_the_ordinal_head_when_told_the_classes_are_graded(tmp_path, capsys, monkeypatch):
    """Image folders declare nothing, so the plan was for the linear head (5 classes: d = 3,365) where a graded run
    trains the ordinal head (677): --graded plans what that run trains."""
    import fedtl.federation.deployment as deployment
    import fedtl.federation.site as site_module

    heads = []

    class Counted:
        def __init__(self, cfg):
            heads.append(cfg.model.head)

        def param_counts(self):
            return {"trainable_params": 677 if heads[-1] == "ordinal" else 3365}

    monkeypatch.setattr(deployment, "local_backbone_sha256", lambda name: "f" * 64)
    monkeypatch.setattr(site_module, "build_transfer_model", lambda cfg, k: Counted(cfg))
    conf = _plan_site(tmp_path, 300)
    out = _run(capsys, ["site", "check", str(conf)])[1]
    assert heads[-1] == "linear" and "(d = 3365)" in out
    out = _run(capsys, ["site", "check", str(conf), "--graded"])[1]
    assert heads[-1] == "ordinal" and "(d = 677)" in out and "(ordinal head: --graded)" in out
