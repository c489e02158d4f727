"""A site's TOML policy file: every field validated, errors name the key, the value and the file."""

import dataclasses
from pathlib import Path

import pytest

from fedtl.errors import ConfigError
from fedtl.site_config import SiteConfig

FULL = """\
name = "st-mary_2"
state-dir = "state"

[data]
format = "folder"
path = "images"
labels = "labels.csv"
image-size = 64
classes = ["normal", "pneumonia"]

[privacy]
target-epsilon = 2
delta = 1e-6

[tls]
ca-cert = "certs/ca.pem"

[auth]
private-key = "keys/site"
public-key = "/etc/fedtl/site.pub"
"""

MINIMAL = 'name = "s1"\n[data]\nformat = "medmnist"\npath = "m.npz"\n'


def write(tmp_path: Path, text: str, name: str = "site.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_full_file_loads_with_paths_resolved_against_its_folder(tmp_path):
    cfg = SiteConfig.load(write(tmp_path, FULL))
    base = tmp_path.resolve()
    assert cfg.name == "st-mary_2"
    assert cfg.data.format == "folder" and cfg.data.image_size == 64
    assert cfg.data.path == base / "images" and cfg.data.labels == base / "labels.csv"
    assert cfg.data.classes == ("normal", "pneumonia")
    assert cfg.privacy.target_epsilon == 2.0 and isinstance(cfg.privacy.target_epsilon, float)
    assert cfg.privacy.delta == 1e-6
    assert cfg.state_dir == base / "state" and cfg.tls.ca_cert == base / "certs" / "ca.pem"
    assert cfg.auth.private_key == base / "keys" / "site" and cfg.auth.public_key == Path("/etc/fedtl/site.pub")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "other"  # type: ignore[misc]


def test_defaults_and_flat_dotted_keys(tmp_path):
    cfg = SiteConfig.load(write(tmp_path, 'name = "s1"\n"data.format" = "medmnist"\n"data.path" = "m.npz"\n'))
    assert cfg.data.image_size == 0 and cfg.data.split == "train" and cfg.data.classes == ()
    assert cfg.privacy.target_epsilon == 3.0 and cfg.privacy.delta == 1e-5
    assert cfg.state_dir == tmp_path.resolve() / "state" / "s1"
    assert cfg.tls.ca_cert is None and cfg.auth.private_key is None and cfg.auth.public_key is None


@pytest.mark.parametrize("old,new,message", [
    ("target-epsilon = 2", "target-epsilon = -1", "`privacy.target-epsilon` must be a finite number > 0, got -1 (in site.toml)."),
    ("target-epsilon = 2", "target-epsilon = nan", "`privacy.target-epsilon` must be a finite number > 0, got nan"),
    ("target-epsilon = 2", 'target-epsilon = "3"', "`privacy.target-epsilon` must be a number, got '3'"),
    ("delta = 1e-6", "delta = 1.5", "`privacy.delta` must be a finite number in (0, 1), got 1.5 (in site.toml)."),
    ('format = "folder"', 'format = "png"', "`data.format` must be one of medmnist, folder, dicom, got 'png'"),
    ('name = "st-mary_2"', 'name = "st mary"', "`name` must be 1-64 characters from A-Z, a-z, 0-9, '_' and '-', got 'st mary'"),
    ('name = "st-mary_2"', 'name = ""', "`name` must be 1-64 characters"),
    ("image-size = 64", "image-size = 2", "`data.image-size` must be 0 (automatic) or an integer between 8 and 4096 pixels, got 2"),
    ("image-size = 64", "image-size = 64.5", "`data.image-size` must be an integer, got 64.5"),
    ('classes = ["normal", "pneumonia"]', 'classes = ["a", "a"]', "`data.classes` must not repeat a name (repeated: a)"),
    ('classes = ["normal", "pneumonia"]', 'classes = ["only"]', "`data.classes` must list at least two"),
    ('classes = ["normal", "pneumonia"]', "classes = [0, 1]", "`data.classes` must be a list of class names"),
    ('labels = "labels.csv"', "", "`data.labels` must name a CSV with header `file,label` when data.format is 'folder'"),
    ('labels = "labels.csv"', 'labels = "l.csv"\nsplit = "val"', "`data.split` is only used with data.format \"medmnist\""),
    ('path = "images"', 'path = ""', "`data.path` must name the site's data"),
    ('public-key = "/etc/fedtl/site.pub"', "", "`auth.private-key` is set but `auth.public-key` is not"),
    ('ca-cert = "certs/ca.pem"', "ca-cert = 3", "`tls.ca-cert` must be a string, got 3"),
])
def test_bad_values_name_the_field_the_value_and_the_file(tmp_path, monkeypatch, old, new, message):
    assert old in FULL
    monkeypatch.chdir(tmp_path)
    write(tmp_path, FULL.replace(old, new))
    with pytest.raises(ConfigError) as err:
        SiteConfig.load("site.toml")
    assert message in str(err.value)
    assert "(in site.toml)" in str(err.value)


def test_unknown_keys_get_a_close_match(tmp_path):
    path = write(tmp_path, FULL.replace("target-epsilon", "target-epsilom"))
    with pytest.raises(ConfigError, match=r"Unknown key `privacy.target-epsilom` \(in .*site.toml\); "
                                          r"did you mean `privacy.target-epsilon`\?"):
        SiteConfig.load(path)
    with pytest.raises(ConfigError, match=r"Unknown key `xyz` \(in .*b.toml\)\. Known keys: name, state-dir"):
        SiteConfig.load(write(tmp_path, 'xyz = "red"\n' + MINIMAL, "b.toml"))
    with pytest.raises(ConfigError, match=r"`privacy` must be a table"):
        SiteConfig.load(write(tmp_path, 'privacy = 3\n' + MINIMAL, "c.toml"))


@pytest.mark.parametrize("drop,key", [('name = "s1"\n', "name"), ('format = "medmnist"\n', "data.format"),
                                      ('path = "m.npz"\n', "data.path")])
def test_required_keys(tmp_path, drop, key):
    with pytest.raises(ConfigError, match=rf"`{key}` is required but missing"):
        SiteConfig.load(write(tmp_path, MINIMAL.replace(drop, "")))


def test_labels_are_rejected_for_medmnist(tmp_path):
    with pytest.raises(ConfigError, match=r"`data.labels` is only used with data.format \"folder\" or \"dicom\""):
        SiteConfig.load(write(tmp_path, MINIMAL + 'labels = "l.csv"\n'))


def test_unreadable_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        SiteConfig.load(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        SiteConfig.load(write(tmp_path, "name = \n"))


def test_missing_files_lists_configured_paths_that_do_not_exist(tmp_path):
    cfg = SiteConfig.load(write(tmp_path, FULL))  # nothing exists yet: loading does not check
    assert [key for key, _ in cfg.missing_files()] == ["data.path", "data.labels", "tls.ca-cert",
                                                       "auth.private-key", "auth.public-key"]
    (tmp_path / "images").mkdir()
    (tmp_path / "labels.csv").write_text("file,label\n")
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_text("cert")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "site").write_text("key")
    assert cfg.missing_files() == (("auth.public-key", Path("/etc/fedtl/site.pub")),)
    minimal = SiteConfig.load(write(tmp_path, MINIMAL, "m.toml"))
    assert minimal.missing_files() == (("data.path", tmp_path.resolve() / "m.npz"),)


LITE0 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def test_input_limits_and_weights_allow_list_default_and_validate(tmp_path):
    cfg = SiteConfig.load(write(tmp_path, MINIMAL))
    assert cfg.data.max_pixels == 32_000_000
    assert cfg.backbone.allowed_sha256 is None and cfg.backbone.max_weights_bytes == 200_000_000  # None: published
    text = MINIMAL + f'max-pixels = 5000000\n[backbone]\nallowed-sha256 = ["{LITE0.upper()}"]\nmax-weights-mb = 30\n'
    cfg = SiteConfig.load(write(tmp_path, text, "b.toml"))
    assert cfg.data.max_pixels == 5_000_000 and cfg.backbone.allowed_sha256 == (LITE0,)
    assert cfg.backbone.max_weights_bytes == 30_000_000
    none = SiteConfig.load(write(tmp_path, MINIMAL + "[backbone]\nallowed-sha256 = []\n", "c.toml"))
    assert none.backbone.allowed_sha256 == ()  # accept no weights from a server


@pytest.mark.parametrize("extra,message", [
    ("max-pixels = 100", "`data.max-pixels` must be an integer between 4096 and 178956970 (width x height of the "
                         "largest image to decode; default 32000000), got 100"),
    ("max-pixels = 1e9", "`data.max-pixels` must be an integer, got 1000000000.0"),
    ('[backbone]\nallowed-sha256 = ["5793"]', "`backbone.allowed-sha256` must list sha256 hashes of 64 hex digits "
                                               "each, got '5793'"),
    (f'[backbone]\nallowed-sha256 = "{LITE0}"', "`backbone.allowed-sha256` must be a list of sha256 hashes"),
    ("[backbone]\nmax-weights-mb = 0", "`backbone.max-weights-mb` must be an integer between 1 and 4096 (MB), got 0"),
    ("[backbone]\nallowed = []", "Unknown key `backbone.allowed` (in site.toml); did you mean `backbone.allowed-sha256`?"),
])
def test_bad_limits_and_hashes_name_the_key_and_value(tmp_path, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, MINIMAL + extra + "\n")
    with pytest.raises(ConfigError) as err:
        SiteConfig.load("site.toml")
    assert message in str(err.value) and "site.toml" in str(err.value)


def test_a_folder_or_a_non_utf8_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"Site config file .* cannot be read \(.*Is a directory"):
        SiteConfig.load(tmp_path)
    (tmp_path / "latin1.toml").write_bytes('name = "s1"  # Zürich\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.toml cannot be read \(.*utf-8"):
        SiteConfig.load(tmp_path / "latin1.toml")


def test_labels_column_is_read_and_validated(tmp_path):
    site = SiteConfig.load(write(tmp_path, FULL.replace('labels = "labels.csv"',
                                                        'labels = "labels.csv"\nlabels-column = " abnormal "')))
    assert site.data.labels_column == "abnormal"
    assert SiteConfig.load(write(tmp_path, FULL)).data.labels_column == "label"
    for bad, message in (('""', "got ''"), ('"file"', "not `file`"), ("3", "must be a string")):
        with pytest.raises(ConfigError, match="data.labels-column") as err:
            SiteConfig.load(write(tmp_path, FULL.replace('labels = "labels.csv"', f'labels = "labels.csv"\nlabels-column = {bad}')))
        assert message in str(err.value)
    with pytest.raises(ConfigError, match="labels-column.*only used with data.format"):
        SiteConfig.load(write(tmp_path, MINIMAL + 'labels-column = "abnormal"\n'))


def test_an_evaluation_set_reads_its_labels_column_like_data(tmp_path):
    text = FULL.replace('labels = "labels.csv"', 'labels = "labels.csv"\nlabels-column = "abnormal"')
    own = text + '[evaluation]\nformat = "folder"\npath = "t"\nlabels = "t.csv"\n'
    assert SiteConfig.load(write(tmp_path, own)).evaluation.data.labels_column == "abnormal"  # [data]'s by default
    other = own + 'labels-column = "finding"\n'
    assert SiteConfig.load(write(tmp_path, other)).evaluation.data.labels_column == "finding"
    npz = text + '[evaluation]\nformat = "medmnist"\npath = "t.npz"\n'
    assert SiteConfig.load(write(tmp_path, npz)).evaluation.data.labels_column == "label"  # an npz has no CSV
    with pytest.raises(ConfigError, match="`evaluation.labels-column` must name"):
        SiteConfig.load(write(tmp_path, own + 'labels-column = "file"\n'))


def test_the_site_caps_or_refuses_local_fine_tuning_in_its_own_file(tmp_path):
    from fedtl.privacy.policy import policy_for_site

    assert SiteConfig.load(write(tmp_path, MINIMAL)).privacy.max_personalize_epochs == 5
    refusing = SiteConfig.load(write(tmp_path, MINIMAL + "[privacy]\nmax-personalize-epochs = 0\n"))
    assert policy_for_site(refusing).max_personalize_epochs == 0
    for bad in ("-1", "21", "true", "2.5"):
        with pytest.raises(ConfigError, match="max-personalize-epochs"):
            SiteConfig.load(write(tmp_path, MINIMAL + f"[privacy]\nmax-personalize-epochs = {bad}\n"))


def test_the_site_alone_decides_whether_its_local_fine_tuning_is_private(tmp_path):
    from fedtl.privacy.policy import policy_for_site

    assert policy_for_site(SiteConfig.load(write(tmp_path, MINIMAL))).personalize_dp  # private unless it says not
    local = SiteConfig.load(write(tmp_path, MINIMAL + "[privacy]\npersonalize-dp = false\n"))
    assert local.privacy.personalize_dp is False and policy_for_site(local).personalize_dp is False
    for bad in ('"false"', "0", "1"):
        with pytest.raises(ConfigError, match="personalize-dp"):
            SiteConfig.load(write(tmp_path, MINIMAL + f"[privacy]\npersonalize-dp = {bad}\n"))
