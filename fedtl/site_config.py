"""A data site's own policy file: which images it trains on, its privacy budget, its keys.

The site operator writes it (``site.toml``), never the server::

    name = "st-mary"
    state-dir = "state"            # privacy ledger and feature cache

    [data]
    format = "folder"              # medmnist | folder | dicom
    path = "images"                # .npz for medmnist, a folder for folder / dicom
    labels = "labels.csv"          # header `file,label`; folder / dicom only
    labels-column = "label"        # the CSV column holding the labels (default `label`)
    image-size = 224               # 0 / omitted: native size (medmnist), 224 (folder, dicom)
    classes = ["normal", "pneumonia"]   # optional: label names in class-index order
    max-pixels = 32000000          # larger images are skipped unread (decompression bombs)

    [evaluation]                   # optional: the site scores the global model on its own labelled data
    format = "folder"              # a separate evaluation set, keys as in [data] …
    path = "test-images"
    labels = "test-labels.csv"
    # holdout = 0.2                # … or this fraction of [data] held out of training (stored split)
    validation-fraction = 0.5      # share used for validation (model selection, threshold); the rest is test
    # split-column = "split"       # … or the labels CSV's column naming each image's split (`validation`/`val`
    #                                or `test`): a fixed test set instead of a random one
    # enabled = false              # opt out: the site answers evaluation requests with no figures
    # release-scores = false       # send the figures but not the per-image score histograms (binary) or
    #                                prediction rows (multi-class) the federation's decision rule is chosen on
    # release-statistics = false   # nor the feature statistics (per-dimension mean and scale) of these images that
    #                                a server without data standardizes training with (default: as release-scores)

    [privacy]                      # the site's policy: a run's config cannot change any of it
    target-epsilon = 3.0           # lifetime budget
    delta = 1e-5
    accountant = "rdp"             # rdp | prv
    max-grad-norm = 1.0            # per-sample clipping bound
    max-epsilon-per-run = 0        # 0: the whole budget
    max-epsilon-per-round = 0      # 0: a quarter of the budget
    max-rounds-per-run = 200
    max-noise-multiplier = 50      # rounds that would need more noise are declined (pure noise)
    max-personalize-epochs = 5     # local DP fine-tuning after the last round, planned in ε (0: never personalize)
    # personalize-dp = false       # fine-tune (or train a local head) without noise, spending no ε: the personal
    #                                suffix never leaves this site, but its validation/test figures are still reported

    [tls]
    ca-cert = "certs/ca.pem"

    [auth]
    private-key = "keys/site"
    public-key = "keys/site.pub"

    [backbone]
    allowed-sha256 = ["5793…"]     # weights a server may send; omitted: the registered published hashes
    max-weights-mb = 200           # larger payloads are refused before hashing

:meth:`SiteConfig.load` rejects unknown keys (with a close-match suggestion) and validates every
value; relative paths are resolved against the file's folder. Key and certificate files are not
required to exist at load time; :meth:`SiteConfig.missing_files` lists those that do not.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtl.config import PrivacyConfig
from fedtl.errors import ConfigError

FORMATS = ("medmnist", "folder", "dicom")
SPLITS = ("train", "val", "test")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DEFAULTS = PrivacyConfig()

# Every key a site file may hold, flat and kebab-case (as written in the TOML file).
KNOWN_KEYS = (
    "name", "state-dir",
    "data.format", "data.path", "data.labels", "data.image-size", "data.classes", "data.split", "data.max-pixels",
    "data.labels-column",
    "privacy.target-epsilon", "privacy.delta", "privacy.accountant", "privacy.max-grad-norm",
    "privacy.max-epsilon-per-run", "privacy.max-epsilon-per-round", "privacy.max-rounds-per-run",
    "privacy.max-noise-multiplier", "privacy.max-personalize-epochs", "privacy.personalize-dp",
    "evaluation.enabled", "evaluation.holdout", "evaluation.validation-fraction", "evaluation.format",
    "evaluation.path", "evaluation.labels", "evaluation.image-size", "evaluation.classes", "evaluation.split",
    "evaluation.max-pixels", "evaluation.labels-column", "evaluation.split-column", "evaluation.release-scores",
    "evaluation.release-statistics",
    "tls.ca-cert",
    "auth.private-key", "auth.public-key",
    "backbone.allowed-sha256", "backbone.max-weights-mb",
)
_TABLES = ("data", "evaluation", "privacy", "tls", "auth", "backbone")

# data.max-pixels: the largest image (width x height of one frame) a site decodes. 32 Mpx holds every
# radiograph in use -- a 43x43 cm detector at 100 um is 18.5 Mpx, full-field mammography at 50 um at most
# ~28 Mpx -- while a 33 KB file that claims 100 Mpx is refused from its header, before any pixel is decoded.
# The ceiling is Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS), above which it refuses to open a file.
DEFAULT_MAX_PIXELS = 32_000_000
MAX_PIXELS_CEILING = 178_956_970
# backbone.max-weights-mb: a received weights file larger than this is refused before it is hashed or
# written; the largest registered backbone (ResNet-50) is 98 MB.
DEFAULT_MAX_WEIGHTS_MB = 200
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"`{key}` {allowed}, got {value!r}.")


@dataclass(frozen=True)
class SiteDataConfig:
    format: str
    path: Path
    labels: Path | None = None  # CSV `file,label`; required for folder / dicom
    image_size: int = 0  # square side images are resized to; 0 = native (medmnist) or 224 (folder, dicom)
    classes: tuple[str, ...] = ()  # label names in class-index order; () = integer labels
    split: str = "train"  # the npz split a medmnist site uses
    max_pixels: int = DEFAULT_MAX_PIXELS  # folder / dicom: larger images are skipped before decoding
    labels_column: str = "label"  # folder / dicom: the labels CSV's column of labels (the file column is `file`)
    # folder / dicom evaluation data: the labels CSV's column saying which images are validation and which test
    # (`validation` or `val`, `test`), instead of a random split by validation-fraction ("": none)
    split_column: str = ""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            _fail("data.format", self.format, "must be one of " + ", ".join(FORMATS))
        if not str(self.path).strip():
            _fail("data.path", str(self.path), "must name the site's data (an .npz file or an image folder)")
        if self.format in ("folder", "dicom") and self.labels is None:
            _fail("data.labels", "", f"must name a CSV with header `file,label` when data.format is {self.format!r}")
        if self.format == "medmnist" and self.labels is not None:
            _fail("data.labels", str(self.labels), "is only used with data.format \"folder\" or \"dicom\"; remove it")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or not (self.image_size == 0 or 8 <= self.image_size <= 4096):
            _fail("data.image-size", self.image_size, "must be 0 (automatic) or an integer between 8 and 4096 pixels")
        if self.split not in SPLITS:
            _fail("data.split", self.split, "must be one of " + ", ".join(SPLITS))
        if self.format != "medmnist" and self.split != "train":
            _fail("data.split", self.split, "is only used with data.format \"medmnist\"; remove it")
        if not isinstance(self.labels_column, str) or not self.labels_column.strip() or self.labels_column.strip() == "file":
            _fail("data.labels-column", self.labels_column, "must name the labels CSV's column of labels (not `file`)")
        if self.format == "medmnist" and self.labels_column != "label":
            _fail("data.labels-column", self.labels_column, "is only used with data.format \"folder\" or \"dicom\"; remove it")
        object.__setattr__(self, "labels_column", self.labels_column.strip())
        if not isinstance(self.split_column, str):
            _fail("data.split-column", self.split_column, "must name a column of the labels CSV")
        object.__setattr__(self, "split_column", self.split_column.strip())
        if self.split_column and self.format == "medmnist":
            _fail("data.split-column", self.split_column, "is only used with data.format \"folder\" or \"dicom\" (a "
                  "labels CSV); a MedMNIST file's images are one split (`split`), its validation share set by "
                  "validation-fraction")
        if self.split_column in ("file", self.labels_column):
            _fail("data.split-column", self.split_column, "must be a column other than `file` and the labels column")
        names = list(self.classes)
        if names and (len(names) < 2 or any(not isinstance(c, str) or not c.strip() for c in names)):
            _fail("data.classes", names, "must list at least two non-empty class names (or be left out)")
        if len(set(names)) != len(names):
            dupes = sorted({c for c in names if names.count(c) > 1})
            _fail("data.classes", names, f"must not repeat a name (repeated: {', '.join(dupes)})")
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) \
                or not 4096 <= self.max_pixels <= MAX_PIXELS_CEILING:
            _fail("data.max-pixels", self.max_pixels, f"must be an integer between 4096 and {MAX_PIXELS_CEILING} "
                  f"(width x height of the largest image to decode; default {DEFAULT_MAX_PIXELS})")


@dataclass(frozen=True)
class SiteEvaluationConfig:
    """Where a site's evaluation figures come from: a separate labelled set (``data``), or ``holdout``, a
    fraction of its training data kept out of training by a split stored in its state dir. Either is
    split into validation and test by ``validation_fraction`` (stratified, stored)."""

    enabled: bool = False  # False: no [evaluation] table, or `enabled = false` (opt out)
    data: SiteDataConfig | None = None
    holdout: float = 0.0
    validation_fraction: float = 0.5
    # the score histograms (binary) or prediction rows (multi-class) of its splits, which a federation without server
    # data chooses its decision rule on (fedtl.federation.fedeval), and its evaluation images' feature statistics
    # (fedtl.federation.site_stats); False: figures only
    release_scores: bool = True
    # the feature statistics alone (``evaluation.release-statistics``; omitted: as ``release-scores``)
    release_statistics: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.release_scores, bool):
            _fail("evaluation.release-scores", self.release_scores, "must be true or false")
        if not isinstance(self.release_statistics, bool):
            _fail("evaluation.release-statistics", self.release_statistics, "must be true or false")
        if not isinstance(self.holdout, (int, float)) or isinstance(self.holdout, bool) \
                or not (self.holdout == 0 or 0.02 <= self.holdout <= 0.5):
            _fail("evaluation.holdout", self.holdout, "must be 0 (off) or a fraction between 0.02 and 0.5")
        if not isinstance(self.validation_fraction, (int, float)) or isinstance(self.validation_fraction, bool) \
                or not 0 <= self.validation_fraction <= 1:
            _fail("evaluation.validation-fraction", self.validation_fraction, "must be a fraction in [0, 1]")
        if self.enabled and (self.data is None) == (self.holdout == 0):
            _fail("evaluation", "", "needs either its own data (`format` and `path`, as in [data]) or `holdout`, "
                  "not both and not neither")


@dataclass(frozen=True)
class SitePrivacyConfig:
    """The site's privacy policy: the only authority over what it spends (a run's config cannot change it)."""

    target_epsilon: float = _DEFAULTS.target_epsilon  # the site's budget for everything it ever trains
    delta: float = _DEFAULTS.delta
    accountant: str = "rdp"  # rdp | prv; pinned in the ledger when it starts
    max_grad_norm: float = _DEFAULTS.max_grad_norm  # per-sample clipping bound
    max_epsilon_per_run: float = 0.0  # 0: the whole budget
    max_epsilon_per_round: float = 0.0  # 0: a quarter of the budget
    max_rounds_per_run: int = _DEFAULTS.max_rounds_per_run
    max_noise_multiplier: float = _DEFAULTS.max_noise_multiplier  # rounds needing more noise are declined
    max_personalize_epochs: int = 5  # local fine-tuning after the last round (0: the site never personalizes)
    personalize_dp: bool = True  # False: that fine-tuning runs without noise and spends no ε (the suffix stays here)

    def __post_init__(self) -> None:
        def finite(key: str, value: Any, ok: bool, allowed: str) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok:
                _fail(key, value, allowed)

        finite("privacy.target-epsilon", self.target_epsilon, self.target_epsilon > 0, "must be a finite number > 0")
        finite("privacy.delta", self.delta, 0 < self.delta < 1, "must be a finite number in (0, 1)")
        finite("privacy.max-grad-norm", self.max_grad_norm, self.max_grad_norm > 0, "must be a finite number > 0")
        finite("privacy.max-epsilon-per-run", self.max_epsilon_per_run, self.max_epsilon_per_run >= 0,
               "must be a finite number >= 0 (0 = the whole budget)")
        finite("privacy.max-epsilon-per-round", self.max_epsilon_per_round, self.max_epsilon_per_round >= 0,
               "must be a finite number >= 0 (0 = a quarter of the budget)")
        finite("privacy.max-noise-multiplier", self.max_noise_multiplier, self.max_noise_multiplier > 0,
               "must be a finite number > 0")
        if isinstance(self.max_rounds_per_run, bool) or not isinstance(self.max_rounds_per_run, int) or self.max_rounds_per_run < 1:
            _fail("privacy.max-rounds-per-run", self.max_rounds_per_run, "must be an integer >= 1")
        m = self.max_personalize_epochs
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= 20:
            _fail("privacy.max-personalize-epochs", m, "must be an integer between 0 (never fine-tune) and 20")
        if not isinstance(self.personalize_dp, bool):
            _fail("privacy.personalize-dp", self.personalize_dp, "must be true or false")
        if self.accountant not in ("rdp", "prv"):
            _fail("privacy.accountant", self.accountant, "must be one of rdp, prv")
        # validated as written (an error says "got -1", not "got -1.0"), stored as float
        for name in ("target_epsilon", "delta", "max_grad_norm", "max_epsilon_per_run", "max_epsilon_per_round",
                     "max_noise_multiplier"):
            object.__setattr__(self, name, float(getattr(self, name)))


@dataclass(frozen=True)
class SiteTLSConfig:
    ca_cert: Path | None = None  # None: not configured (simulation)


@dataclass(frozen=True)
class SiteAuthConfig:
    private_key: Path | None = None
    public_key: Path | None = None

    def __post_init__(self) -> None:
        if (self.private_key is None) != (self.public_key is None):
            given, absent = ("auth.private-key", "auth.public-key") if self.public_key is None else ("auth.public-key", "auth.private-key")
            raise ConfigError(f"`{given}` is set but `{absent}` is not; set both (node authentication) or neither.")


@dataclass(frozen=True)
class SiteBackboneConfig:
    """Which weights a server may send this site (it never replaces weights the site already holds)."""

    allowed_sha256: tuple[str, ...] | None = None  # None: the registered backbones' published hashes; (): none
    max_weights_mb: int = DEFAULT_MAX_WEIGHTS_MB

    def __post_init__(self) -> None:
        bad = [h for h in self.allowed_sha256 or () if not isinstance(h, str) or not _SHA256.fullmatch(h)]
        if bad:
            _fail("backbone.allowed-sha256", bad[0], "must list sha256 hashes of 64 hex digits each")
        if isinstance(self.max_weights_mb, bool) or not isinstance(self.max_weights_mb, int) \
                or not 1 <= self.max_weights_mb <= 4096:
            _fail("backbone.max-weights-mb", self.max_weights_mb, "must be an integer between 1 and 4096 (MB)")

    @property
    def max_weights_bytes(self) -> int:
        return self.max_weights_mb * 1_000_000


@dataclass(frozen=True)
class SiteConfig:
    name: str
    data: SiteDataConfig
    state_dir: Path
    privacy: SitePrivacyConfig = field(default_factory=SitePrivacyConfig)
    evaluation: SiteEvaluationConfig = field(default_factory=SiteEvaluationConfig)
    tls: SiteTLSConfig = field(default_factory=SiteTLSConfig)
    auth: SiteAuthConfig = field(default_factory=SiteAuthConfig)
    backbone: SiteBackboneConfig = field(default_factory=SiteBackboneConfig)
    source: Path | None = None  # the file it was loaded from

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            _fail("name", self.name, "must be 1-64 characters from A-Z, a-z, 0-9, '_' and '-'")

    @classmethod
    def load(cls, path: str | Path) -> SiteConfig:
        """Read and validate a site file; every error names the key, the value and the file."""
        p = Path(path).expanduser()
        try:
            with p.open("rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"Site config file {p} does not exist; pass the path of the site's TOML file.") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Site config file {p} cannot be read ({exc}).") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"Site config file {p} is not valid TOML: {exc}.") from exc
        try:
            return _from_mapping(_flatten(raw, str(path)), base=p.resolve().parent, source=p)
        except ConfigError as exc:
            msg = str(exc)
            if f"(in {path})" in msg:
                raise
            raise ConfigError(f"{msg.removesuffix('.')} (in {path}).") from None

    def configured_paths(self) -> tuple[tuple[str, Path], ...]:
        """``(key, path)`` for every file or folder the site file names (state-dir excluded: it is created)."""
        ev = self.evaluation.data
        pairs = [("data.path", self.data.path), ("data.labels", self.data.labels),
                 ("evaluation.path", ev.path if ev else None), ("evaluation.labels", ev.labels if ev else None),
                 ("tls.ca-cert", self.tls.ca_cert),
                 ("auth.private-key", self.auth.private_key), ("auth.public-key", self.auth.public_key)]
        return tuple((key, p) for key, p in pairs if p is not None)

    def missing_files(self) -> tuple[tuple[str, Path], ...]:
        """``(key, path)`` for each configured path that does not exist."""
        return tuple((key, p) for key, p in self.configured_paths() if not p.exists())


def _flatten(data: dict, where: str, prefix: str = "") -> dict[str, Any]:
    """``[data] format = …`` and ``"data.format" = …`` both become ``{"data.format": …}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, where, full + "."))
        elif full in _TABLES:
            raise ConfigError(f"`{full}` must be a table (`[{full}]` with keys below it), got {value!r} (in {where}).")
        else:
            flat[full] = value
    for key in flat:
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.6)
            hint = f"; did you mean `{close[0]}`?" if close else "."
            raise ConfigError(f"Unknown key `{key}` (in {where}){hint} Known keys: {', '.join(KNOWN_KEYS)}.")
    return flat


def _from_mapping(flat: dict[str, Any], *, base: Path, source: Path) -> SiteConfig:
    for key in ("name", "data.format", "data.path"):
        if key not in flat:
            raise ConfigError(f"`{key}` is required but missing; add it to the site file.")
    name = _text(flat, "name")

    def path_of(key: str) -> Path | None:
        text = _text(flat, key)
        return _resolve(text, base) if text.strip() else None

    data_path = path_of("data.path")
    if data_path is None:
        _fail("data.path", flat["data.path"], "must name the site's data (an .npz file or an image folder)")
    data = SiteDataConfig(
        format=_text(flat, "data.format"),
        path=data_path,
        labels=path_of("data.labels"),
        image_size=_integer(flat, "data.image-size", 0),
        classes=_names(flat, "data.classes"),
        split=_text(flat, "data.split", "train"),
        max_pixels=_integer(flat, "data.max-pixels", DEFAULT_MAX_PIXELS),
        labels_column=_text(flat, "data.labels-column", "label"),
    )
    state = path_of("state-dir") or base / "state" / name
    return SiteConfig(
        evaluation=_evaluation(flat, path_of, data),
        name=name,
        data=data,
        state_dir=state,
        privacy=SitePrivacyConfig(
            target_epsilon=_number(flat, "privacy.target-epsilon", _DEFAULTS.target_epsilon),
            delta=_number(flat, "privacy.delta", _DEFAULTS.delta),
            accountant=_text(flat, "privacy.accountant", "rdp"),
            max_grad_norm=_number(flat, "privacy.max-grad-norm", _DEFAULTS.max_grad_norm),
            max_epsilon_per_run=_number(flat, "privacy.max-epsilon-per-run", 0.0),
            max_epsilon_per_round=_number(flat, "privacy.max-epsilon-per-round", 0.0),
            max_rounds_per_run=_integer(flat, "privacy.max-rounds-per-run", _DEFAULTS.max_rounds_per_run),
            max_noise_multiplier=_number(flat, "privacy.max-noise-multiplier", _DEFAULTS.max_noise_multiplier),
            max_personalize_epochs=_integer(flat, "privacy.max-personalize-epochs", 5),
            personalize_dp=flat.get("privacy.personalize-dp", True),
        ),
        tls=SiteTLSConfig(ca_cert=path_of("tls.ca-cert")),
        auth=SiteAuthConfig(private_key=path_of("auth.private-key"), public_key=path_of("auth.public-key")),
        backbone=SiteBackboneConfig(
            allowed_sha256=_hashes(flat, "backbone.allowed-sha256"),
            max_weights_mb=_integer(flat, "backbone.max-weights-mb", DEFAULT_MAX_WEIGHTS_MB),
        ),
        source=source,
    )


def _evaluation(flat: dict[str, Any], path_of, data: SiteDataConfig) -> SiteEvaluationConfig:
    keys = [k for k in flat if k.startswith("evaluation.")]
    if not keys:
        return SiteEvaluationConfig()
    enabled = flat.get("evaluation.enabled", True)
    if not isinstance(enabled, bool):
        _fail("evaluation.enabled", enabled, "must be true or false")
    own = None
    if "evaluation.path" in flat or "evaluation.format" in flat:
        for key in ("evaluation.format", "evaluation.path"):
            if key not in flat:
                raise ConfigError(f"`{key}` is required when [evaluation] names its own data; add it to the site file.")
        ev_path = path_of("evaluation.path")
        if ev_path is None:
            _fail("evaluation.path", flat["evaluation.path"], "must name the evaluation data (an .npz file or a folder)")
        try:
            own = SiteDataConfig(
                format=_text(flat, "evaluation.format"), path=ev_path, labels=path_of("evaluation.labels"),
                image_size=_integer(flat, "evaluation.image-size", data.image_size),
                classes=_names(flat, "evaluation.classes") or data.classes,
                split=_text(flat, "evaluation.split", "test" if _text(flat, "evaluation.format") == "medmnist" else "train"),
                max_pixels=_integer(flat, "evaluation.max-pixels", data.max_pixels),
                labels_column=_text(flat, "evaluation.labels-column",
                                    "label" if _text(flat, "evaluation.format") == "medmnist" else data.labels_column),
                split_column=_text(flat, "evaluation.split-column", ""))
        except ConfigError as exc:  # the same checks as [data], named as [evaluation]'s keys
            raise ConfigError(str(exc).replace("`data.", "`evaluation.")) from None
        if own.split_column and "evaluation.validation-fraction" in flat:
            _fail("evaluation.validation-fraction", flat["evaluation.validation-fraction"],
                  f"is not used with `split-column` ({own.split_column!r} names each image's split); remove one of them")
    elif "evaluation.split-column" in flat:
        _fail("evaluation.split-column", flat["evaluation.split-column"], "needs [evaluation]'s own labelled data "
              "(`format`, `path`, `labels`); a holdout of [data] is split by validation-fraction")
    return SiteEvaluationConfig(enabled=enabled,
                                data=own if enabled else None,
                                holdout=_number(flat, "evaluation.holdout", 0.0) if enabled else 0.0,
                                validation_fraction=_number(flat, "evaluation.validation-fraction", 0.5),
                                release_scores=flat.get("evaluation.release-scores", True),
                                release_statistics=flat.get("evaluation.release-statistics",
                                                            flat.get("evaluation.release-scores", True)))


def _resolve(text: str, base: Path) -> Path:
    p = Path(text).expanduser()
    return p if p.is_absolute() else base / p


def _text(flat: dict[str, Any], key: str, default: str = "") -> str:
    value = flat.get(key, default)
    if not isinstance(value, str):
        _fail(key, value, "must be a string")
    return value


def _integer(flat: dict[str, Any], key: str, default: int) -> int:
    value = flat.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(key, value, "must be an integer")
    return value


def _number(flat: dict[str, Any], key: str, default: float) -> float:
    value = flat.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(key, value, "must be a number")
    return value


def _names(flat: dict[str, Any], key: str) -> tuple[str, ...]:
    value = flat.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(key, value, 'must be a list of class names, e.g. ["normal", "pneumonia"]')
    return tuple(value)


def _hashes(flat: dict[str, Any], key: str) -> tuple[str, ...] | None:
    if key not in flat:
        return None
    value = flat[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(key, value, 'must be a list of sha256 hashes, e.g. ["5793…"] (or [] to accept no weights from a server)')
    return tuple(v.strip().lower() for v in value)
