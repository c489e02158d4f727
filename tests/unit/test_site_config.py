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
