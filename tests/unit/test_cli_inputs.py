"""Bad files and paths handed to the CLI: one `error:` line, the documented exit code, and no state changed.

State is the run directory (and the simulated sites' ledgers in it) and the feature cache; each
test snapshots them before and compares after.
"""

import zipfile

import numpy as np
import pytest

from fedtl.cli import main


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A run directory holding a previous run's ledger, and an empty feature cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDTL_CACHE_DIR", str(cache))
    run = tmp_path / "run"
    (run / "sites" / "site-0").mkdir(parents=True)
    (run / "sites" / "site-0" / "privacy-ledger.json").write_text('{"epsilon": 1.25}')
    return tmp_path, run, cache


def _state(run, cache):
    files = [p for root in (run, cache) if root.exists() for p in sorted(root.rglob("*"))]
    return {str(p): p.read_bytes() if p.is_file() else None for p in files}


def _npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 255, (12, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(12) % 2).reshape(12, 1)
    arrays.update(overrides)
    np.savez_compressed(path, **arrays)
    return path


def _corrupt_deflate(path):
    """Overwrite 40 bytes inside the first member's deflate stream: the zip directory stays intact."""
    with zipfile.ZipFile(path) as z:
        info = z.infolist()[0]
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw = bytearray(path.read_bytes())
    raw[start + 20:start + 60] = b"\xff" * 40
    path.write_bytes(bytes(raw))
    return path


def _run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


BAD_DATA = {
    "corrupt deflate stream": (lambda p: _corrupt_deflate(_npz(p)),
                               "is not a readable .npz archive (Error -3 while decompressing data"),
    "empty val split": (lambda p: _npz(p, val_images=np.zeros((0, 8, 8), np.uint8), val_labels=np.zeros((0, 1))),
                        "the `val` split holds no images; it needs at least one (`val_images` has shape (0, 8, 8))"),
    "empty train split, 1-d labels": (lambda p: _npz(p, train_images=np.zeros((0, 8, 8), np.uint8),
                                                     train_labels=np.zeros(0, np.int64)),
                                      "the `train` split holds no images"),
    "text labels": (lambda p: _npz(p, test_labels=np.array(["a"] * 12)),
                    "`test_labels` must hold integer class indices, got <U1 (12,)"),
    "a folder": (lambda p: p.mkdir() or p, "is a folder; `data.path` must name a MedMNIST-format .npz file"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_npz_exits_3_and_leaves_run_ledger_and_cache_alone(isolated, capsys, case):
    tmp, run, cache = isolated
    make, fragment = BAD_DATA[case]
    data = make(tmp / "data.npz")
    before = _state(run, cache)
    code, err = _run(capsys, ["simulate", "--out", str(run), "--overwrite", "--data", str(data)])
    assert code == 3 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert _state(run, cache) == before and not cache.exists()


def test_bad_npz_at_a_site_is_one_line_and_creates_no_state(tmp_path, capsys):
    data = _corrupt_deflate(_npz(tmp_path / "d.npz"))
    conf = tmp_path / "site.toml"
    conf.write_text('name = "st-mary"\nstate-dir = "state"\n[data]\nformat = "medmnist"\npath = "d.npz"\n')
    code, err = _run(capsys, ["site", "check", str(conf)])
    assert code == 3 and err[-1].startswith("error: Data file ") and "not a readable .npz" in err[-1]
    assert not (tmp_path / "state").exists() and data.exists()


def _latin1(path):
    path.write_bytes('[federation]\nsites = 3  # Zürich\n'.encode("latin-1"))
    return path


BAD_CONFIG = {
    "a folder": (lambda p: p.mkdir() or p, "is a folder; pass the path of a TOML file"),
    "not UTF-8": (_latin1, "is not UTF-8 text (byte 0xfc at offset 27); save it as UTF-8"),
    "not TOML": (lambda p: (p.write_text("sites = \n"), p)[1], "is not valid TOML"),
    "absent": (lambda p: p, "does not exist"),
}


@pytest.mark.parametrize("case", BAD_CONFIG)
@pytest.mark.parametrize("command", ["simulate", "config"])
def test_bad_config_file_exits_2_with_one_line(isolated, capsys, case, command):
    tmp, run, cache = isolated
    make, fragment = BAD_CONFIG[case]
    conf = make(tmp / "c.toml")
    before = _state(run, cache)
    argv = [command, "--config", str(conf)] + (["--out", str(run), "--overwrite"] if command == "simulate" else [])
    code, err = _run(capsys, argv)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: Config file {conf} {fragment}"), err
    assert _state(run, cache) == before


@pytest.mark.parametrize("where,fragment", [
    ("file/run", "cannot be created: {tmp}/file is a file, not a folder."),
    ("/proc/fedtl-run", "cannot be written: /proc refuses new entries"),
])
def test_an_unusable_out_path_is_refused_before_any_work(isolated, capsys, where, fragment):
    tmp, run, cache = isolated
    (tmp / "file").write_text("x")
    out = tmp / where
    before = _state(run, cache)
    code, err = _run(capsys, ["simulate", "--out", str(out)])
    assert code == 2 and len(err) == 1 and fragment.format(tmp=tmp) in err[0], err
    assert _state(run, cache) == before and not cache.exists()
