"""Typed, frozen run configuration.

One dataclass per section. Flower passes configuration as a flat mapping of kebab-case
keys (``privacy.target-epsilon = 3.0``); :meth:`FedTLConfig.from_run_config` reads such a
mapping, rejects unknown keys with a close-match suggestion and validates every value.
Defaults here are the single source of truth: ``pyproject.toml``'s ``[tool.flwr.app.config]``
mirrors them (a unit test keeps the two equal).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedtl.config_values import coerce, field_type
from fedtl.errors import ConfigError
from fedtl.weighting import aggregation_weights

AUTO_VIEWS = 4  # train.views = 0 (auto) with the head-only suffix
MAX_VIEWS = 8  # train.views: shifted views per training image (each is one more cached prefix output)
POOLINGS = ("avg", "avg-std", "avg-std-grid")
HEADS = ("linear", "mlp", "ordinal")
MAX_CLASS_NAME = 64  # characters in a class name (model.class-names; a request's class-names)
MAX_PERSONALIZE_EPOCHS = 20  # also the most a site's policy allows (fedtl.privacy.policy)


def parse_class_names(text: str) -> tuple[str, ...]:
    """Comma-separated class names (``model.class-names``, a request's ``class-names``): two or more, distinct, each
    1 to :data:`MAX_CLASS_NAME` printable characters, surrounding blanks dropped; ValueError saying what is wrong."""
    names = tuple(n.strip() for n in text.split(","))
    if len(names) < 2 or any(not n or len(n) > MAX_CLASS_NAME or not n.isprintable() for n in names) \
            or len(set(names)) != len(names):
        raise ValueError(f"must be two or more distinct names separated by commas, each 1-{MAX_CLASS_NAME} printable "
                         "characters, in class-index order")
    return names


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"`{key}` {allowed}, got {value!r}.")


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        _fail(key, value, "must be one of " + ", ".join(options))


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "efficientnet_lite0"
    resolution: int = 112  # square input side in pixels, after resizing
    head: str = "auto"  # linear | mlp | ordinal (classes in order, e.g. grades: one score and C − 1 cut points);
    #                     auto: ordinal when the labels are graded (data.labels), linear otherwise (FedTLConfig.resolved)
    head_hidden: int = 256  # width of the MLP head's hidden layer
    cut_after: str = "auto"  # last backbone unit kept ("" = the whole backbone, "auto" = the backbone's recommendation)
    feature_norm: str = "none"  # none | layernorm (per-sample, parameter-free: safe under DP)
    pooling: str = "auto"  # how the head's input is pooled from feature maps: avg | avg-std | avg-std-grid
    #                        (fedtl.model.SpatialPool); auto: avg-std-grid when the head trains on standardized
    #                        features (the server has validation data), avg otherwise (FedTLConfig.resolved)
    num_classes: int = 0  # 0: from the server's evaluation data (required when the server has none)
    class_names: str = ""  # the classes' names in class-index order, comma-separated ("normal,pneumonia"): sent to
    #                        the sites, which refuse a run whose names differ from their own data.classes; in
    #                        `fedtl predict`'s CSV and the exports' metadata. "" = none (the classes are numbered)

    @property
    def names(self) -> tuple[str, ...]:
        """``class_names`` as a tuple; () when the classes are numbered."""
        return tuple(self.class_names.split(",")) if self.class_names else ()

    def __post_init__(self) -> None:
        if not 0 <= self.num_classes <= 1000 or self.num_classes == 1:
            _fail("model.num-classes", self.num_classes, "must be 0 (from the server's data) or between 2 and 1000")
        if self.class_names:
            try:
                names = parse_class_names(str(self.class_names))
            except ValueError as exc:
                _fail("model.class-names", self.class_names, f"{exc} (e.g. \"normal,pneumonia\")")
            if self.num_classes and len(names) != self.num_classes:
                _fail("model.class-names", self.class_names, f"names {len(names)} classes but model.num-classes is "
                      f"{self.num_classes}")
            object.__setattr__(self, "class_names", ",".join(names))
        if not 32 <= self.resolution <= 1024:
            _fail("model.resolution", self.resolution, "must be between 32 and 1024 pixels")
        _choice("model.head", self.head, ("auto", *HEADS))
        _choice("model.feature-norm", self.feature_norm, ("none", "layernorm"))
        _choice("model.pooling", self.pooling, ("auto", *POOLINGS))
        if self.head_hidden < 1:
            _fail("model.head-hidden", self.head_hidden, "must be >= 1")


@dataclass(frozen=True)
class AdaptersConfig:
    kind: str = "none"  # none (head only) | lora | unfreeze  (tuned: docs/benchmarks.md)
    blocks: int = 0  # backbone units at the end that belong to the trainable suffix
    rank: int = 4  # LoRA rank
    alpha: float = 8.0  # LoRA scaling numerator (scale = alpha / rank)
    lr_scale: float = 0.0  # lr multiplier for adapter / unfrozen weights; 0 = auto (1 for LoRA, 0.1 for unfreeze)

    def __post_init__(self) -> None:
        _choice("adapters.kind", self.kind, ("none", "lora", "unfreeze"))
        if self.blocks < 0:
            _fail("adapters.blocks", self.blocks, "must be >= 0")
        if self.kind != "none" and self.blocks == 0:
            _fail("adapters.blocks", self.blocks, f"must be >= 1 when adapters.kind is {self.kind!r}")
        if self.rank < 1:
            _fail("adapters.rank", self.rank, "must be >= 1")
        if self.alpha <= 0:
            _fail("adapters.alpha", self.alpha, "must be > 0")
        if self.lr_scale < 0:
            _fail("adapters.lr-scale", self.lr_scale, "must be >= 0 (0 = automatic)")

    def effective_lr_scale(self) -> float:
        """Pretrained weights that are unfrozen move at a tenth of the head's rate unless set."""
        if self.lr_scale > 0:
            return self.lr_scale
        return 0.1 if self.kind == "unfreeze" else 1.0


@dataclass(frozen=True)
class PrivacyConfig:
    """Privacy settings of a *simulation* (one trust domain). A deployed site ignores all of these:
    its ``site.toml`` is its policy (:class:`fedtl.privacy.policy.PrivacyPolicy`); only
    ``noise-multiplier`` travels to it, as a proposal it can only raise."""

    enabled: bool = True  # simulation only: --no-dp trains without DP for comparison
    target_epsilon: float = 3.0  # per-site budget for the whole run
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # per-sample clipping bound
    noise_multiplier: float = 0.0  # 0: each site calibrates it to its own budget; > 0: a proposal sites may raise
    accountant: str = "rdp"  # rdp | prv (Opacus accountants)
    site_epsilons: str = ""  # optional per-site budgets, comma-separated, e.g. "3,3,1"
    max_epsilon_per_run: float = 0.0  # 0: the whole budget
    max_epsilon_per_round: float = 0.0  # 0: a quarter of the budget
    max_rounds_per_run: int = 200
    max_noise_multiplier: float = 50.0  # a site declines rounds that would need more noise than this
    randomness: str = "os"  # os (secret, from the OS CSPRNG) | seeded (reproducible; simulations only)
    personalize_dp: bool = True  # false: a site's local fine-tuning (personalization.kind = finetune) trains without
    #                              noise and spends no ε; its personal suffix never leaves the site (docs/privacy.md)

    def __post_init__(self) -> None:
        if not self.target_epsilon > 0:
            _fail("privacy.target-epsilon", self.target_epsilon, "must be > 0")
        if not 0 < self.delta < 1:
            _fail("privacy.delta", self.delta, "must be in (0, 1)")
        if not self.max_grad_norm > 0:
            _fail("privacy.max-grad-norm", self.max_grad_norm, "must be > 0")
        if not self.noise_multiplier >= 0:
            _fail("privacy.noise-multiplier", self.noise_multiplier, "must be >= 0 (0 = calibrate)")
        _choice("privacy.accountant", self.accountant, ("rdp", "prv"))
        _choice("privacy.randomness", self.randomness, ("os", "seeded"))
        if not self.max_epsilon_per_run >= 0:
            _fail("privacy.max-epsilon-per-run", self.max_epsilon_per_run, "must be >= 0 (0 = the whole budget)")
        if not self.max_epsilon_per_round >= 0:
            _fail("privacy.max-epsilon-per-round", self.max_epsilon_per_round, "must be >= 0 (0 = a quarter of the budget)")
        if self.max_rounds_per_run < 1:
            _fail("privacy.max-rounds-per-run", self.max_rounds_per_run, "must be >= 1")
        if not self.max_noise_multiplier > 0:
            _fail("privacy.max-noise-multiplier", self.max_noise_multiplier, "must be > 0")
        self.site_budgets()  # validates the list

    def site_budgets(self) -> tuple[float, ...]:
        """Per-site ε budgets given by ``site-epsilons`` (empty: every site uses target-epsilon)."""
        if not self.site_epsilons.strip():
            return ()
        out = []
        for part in self.site_epsilons.split(","):
            try:
                eps = float(part)
            except ValueError:
                eps = float("nan")
            if not (eps > 0 and math.isfinite(eps)):
                _fail("privacy.site-epsilons", self.site_epsilons, "must be a comma-separated list of numbers > 0")
            out.append(eps)
        return tuple(out)

    def budget_for(self, site: int) -> float:
        budgets = self.site_budgets()
        return budgets[site] if site < len(budgets) else self.target_epsilon


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # a MedMNIST-format .npz; empty: the bundled PneumoniaMNIST
    partitioner: str = "dirichlet"  # iid | dirichlet | pathological
    alpha: float = 0.5  # Dirichlet concentration
    classes_per_site: int = 1  # pathological partitioner
    seed: int = 42
    cache_dir: str = ""  # prefix-feature cache; empty: $FEDTL_CACHE_DIR or ~/.cache/fedtl
    labels: str = "auto"  # graded: the classes are ordered grades (0 < 1 < …) | unordered | auto: as the data set
    #                       declares it (MedMNIST's task type for its own files: RetinaMNIST is graded), else unordered

    def __post_init__(self) -> None:
        _choice("data.partitioner", self.partitioner, ("iid", "dirichlet", "pathological"))
        _choice("data.labels", self.labels, ("auto", "graded", "unordered"))
        if self.alpha <= 0:
            _fail("data.alpha", self.alpha, "must be > 0")
        if self.classes_per_site < 1:
            _fail("data.classes-per-site", self.classes_per_site, "must be >= 1")


@dataclass(frozen=True)
class FederationConfig:
    sites: int = 10
    rounds: int = 40
    fraction_train: float = 1.0  # fraction of connected sites sampled each round
    min_sites: int = 1  # quorum: the fewest replies (trained or declined) a round needs
    round_timeout: float = 300.0  # seconds a round waits for the sites' replies (and for sites to connect)
    round_retries: int = 2  # a round short of its quorum is retried this many times, then the run stops (resumable)
    aggregation: str = "multikrum"  # fedavg | fedmedian | fedtrimmedavg | krum | multikrum | bulyan (Flower's; docs/robustness.md)
    max_hostile: int = 1  # sites assumed hostile by krum / multikrum / bulyan (at most sites - 1 are used)
    update_clip: float = 3.0  # each update's norm clipped to this × the round's median (0: off)
    weighting: str = "examples"  # examples: by the site's reported example count, capped | sites: one per site
    weight_cap: float = 1.0  # with weighting = examples: each weight capped at this × the round's median (0: off)

    def __post_init__(self) -> None:
        if self.sites < 1:
            _fail("federation.sites", self.sites, "must be >= 1")
        if self.rounds < 1:
            _fail("federation.rounds", self.rounds, "must be >= 1")
        if not 0 < self.fraction_train <= 1:
            _fail("federation.fraction-train", self.fraction_train, "must be in (0, 1]")
        if self.min_sites < 1:
            _fail("federation.min-sites", self.min_sites, "must be >= 1")
        if self.min_sites > self.sites:
            _fail("federation.min-sites", self.min_sites, f"must be <= federation.sites ({self.sites})")
        if not 0 < self.round_timeout <= 86400:
            _fail("federation.round-timeout", self.round_timeout, "must be in (0, 86400] seconds")
        if not 0 <= self.round_retries <= 100:
            _fail("federation.round-retries", self.round_retries, "must be between 0 and 100")
        _choice("federation.aggregation", self.aggregation,
                ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"))
        if self.max_hostile < 0:
            _fail("federation.max-hostile", self.max_hostile, "must be >= 0")
        if not self.update_clip >= 0:
            _fail("federation.update-clip", self.update_clip, "must be >= 0 (0 = off)")
        if not self.weight_cap >= 0:
            _fail("federation.weight-cap", self.weight_cap, "must be >= 0 (0 = off)")
        _choice("federation.weighting", self.weighting, ("sites", "examples"))

    def aggregation_weights(self, reported: list[float]) -> list[float]:
        """Each accepted update's weight in a round: :func:`aggregation_weights` with this section's settings."""
        return aggregation_weights(reported, self.weighting, self.weight_cap)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1  # local epochs per round
    batch_size: int = 64  # expected batch size (Poisson sampling with DP)
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    optimizer: str = "sgd"  # sgd | adam
    seed: int = 0
    views: int = 0  # augmentation multiplicity: an example's prediction over this many shifted views (fedtl.features);
    #                 0 = auto: 4 with the head-only suffix, 1 with adapters (FedTLConfig.train_views)
    standardize: str = "server"  # server: train the head on features standardized with the server's validation
    #                              statistics (fedtl.standardize; any suffix, no layernorm) | none
    standardize_gain: float = 0.3  # standardized features are z-scores times this

    def __post_init__(self) -> None:
        if not 0 <= self.views <= MAX_VIEWS:
            _fail("train.views", self.views, f"must be between 0 (auto) and {MAX_VIEWS}")
        if self.epochs < 1:
            _fail("train.epochs", self.epochs, "must be >= 1")
        if self.batch_size < 1:
            _fail("train.batch-size", self.batch_size, "must be >= 1")
        if self.lr <= 0:
            _fail("train.lr", self.lr, "must be > 0")
        if not 0 <= self.momentum < 1:
            _fail("train.momentum", self.momentum, "must be in [0, 1)")
        if self.weight_decay < 0:
            _fail("train.weight-decay", self.weight_decay, "must be >= 0")
        _choice("train.optimizer", self.optimizer, ("sgd", "adam"))
        _choice("train.standardize", self.standardize, ("server", "none"))
        if not 0 < self.standardize_gain <= 100:
            _fail("train.standardize-gain", self.standardize_gain, "must be in (0, 100]")


@dataclass(frozen=True)
class EvaluationConfig:
    """Where the global model is scored, how a round is selected and how a label is decided."""

    central: str = "auto"  # on | off | auto: the server's own data (data.path); auto = on when it has data
    sites: str = "auto"  # every-round | final | off | auto: federated evaluation at the sites
    #                      (auto = every round when the server has no data, else once at the end)
    select_by: str = "auto"  # central | federated | auto (central when the server has data)
    decision: str = "threshold"  # threshold (calibrated on validation data: binary, a threshold; multi-class,
    #                              per-class offsets on the server's own validation data) | argmax
    # the server's own evaluation data as image files (instead of data.path's npz): folder | dicom | medmnist
    data_format: str = ""
    data_path: str = ""  # a folder of images (or an .npz)
    data_labels: str = ""  # CSV `file,label` listing them (folder / dicom)
    data_classes: str = ""  # label names in class-index order, comma-separated ("" = integer labels)
    validation_fraction: float = 0.5  # share of those images for validation; the rest is the test split
    views: int = 0  # test-time views: a prediction is the mean probability over this many shifted views of the image
    #                 (fedtl.data.preprocess.shift_view), in evaluation, `predict` and exports alike;
    #                 0 = auto: the training views (FedTLConfig.eval_views); 1 = the image alone

    def __post_init__(self) -> None:
        if not 0 <= self.views <= MAX_VIEWS:
            _fail("evaluation.views", self.views, f"must be between 0 (auto) and {MAX_VIEWS}")
        if self.data_format:
            _choice("evaluation.data-format", self.data_format, ("folder", "dicom", "medmnist"))
        if bool(self.data_format) != bool(self.data_path):
            _fail("evaluation.data-path", self.data_path, "and `evaluation.data-format` must be set together")
        if not 0 < self.validation_fraction < 1:
            _fail("evaluation.validation-fraction", self.validation_fraction, "must be in (0, 1)")
        _choice("evaluation.central", self.central, ("auto", "on", "off"))
        _choice("evaluation.sites", self.sites, ("auto", "every-round", "final", "off"))
        _choice("evaluation.select-by", self.select_by, ("auto", "central", "federated"))
        _choice("evaluation.decision", self.decision, ("threshold", "argmax"))


@dataclass(frozen=True)
class PersonalizationConfig:
    """A personal suffix at each site, kept there (a request: each site's policy decides).

    ``finetune``: DP fine-tuning of the final global suffix after the last round (its ε is planned from round 1).
    ``local-head``: FedRoD-style (Chen & Chao, ICLR 2022): every round a site also trains its own head on the shared
    part's features, in the same DP-SGD steps as its update (no ε of its own); the head stays in its state dir and is
    never sent. After the last round it keeps the global head or its own, on validation evidence."""

    kind: str = "none"  # none | finetune | local-head
    epochs: int = 2  # local epochs of the fine-tuning (a site may cap them: privacy.max-personalize-epochs)

    def __post_init__(self) -> None:
        _choice("personalization.kind", self.kind, ("none", "finetune", "local-head"))
        if not 1 <= self.epochs <= MAX_PERSONALIZE_EPOCHS:
            _fail("personalization.epochs", self.epochs, f"must be between 1 and {MAX_PERSONALIZE_EPOCHS}")

    @property
    def requested_epochs(self) -> int:
        """Epochs the server asks the sites to reserve and spend (0: no personalization)."""
        return self.epochs if self.kind == "finetune" else 0


@dataclass(frozen=True)
class OutputConfig:
    dir: str = ""  # run directory; empty: runs/<timestamp>
    state_dir: str = ""  # per-site state (privacy ledgers); empty: <dir>/sites
    resume: bool = False  # continue the interrupted run in `dir` from its last checkpoint

    def __post_init__(self) -> None:
        pass


_SECTIONS = {
    "model": ModelConfig,
    "adapters": AdaptersConfig,
    "privacy": PrivacyConfig,
    "data": DataConfig,
    "federation": FederationConfig,
    "train": TrainConfig,
    "evaluation": EvaluationConfig,
    "personalization": PersonalizationConfig,
    "output": OutputConfig,
}


@dataclass(frozen=True)
class FedTLConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    personalization: PersonalizationConfig = field(default_factory=PersonalizationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        # NaN and inf slip through comparisons (`nan <= 0` is False): no float setting may hold them.
        for section in _SECTIONS:
            part = getattr(self, section)
            for f in fields(part):
                value = getattr(part, f.name)
                if isinstance(value, float) and not math.isfinite(value):
                    _fail(f"{section}.{f.name.replace('_', '-')}", value, "must be a finite number")
        if self.evaluation.views > 1 and self.adapters.kind != "none":
            _fail("evaluation.views", self.evaluation.views, "needs the head-only suffix (adapters.kind = none): the "
                  "views are cached prefix outputs")
        if self.train.views > 1 and self.adapters.kind != "none":
            _fail("train.views", self.train.views, "needs the head-only suffix (adapters.kind = none): the views are "
                  "cached prefix outputs")

    def has_reference(self, demo_data: bool = False) -> bool:
        """Whether the server will hold validation data to standardize with: central evaluation on or auto, and
        ``data.path`` or ``evaluation.data-path`` set (``demo_data``: ``fedtl simulate``'s bundled data counts)."""
        ev = self.evaluation
        return ev.central != "off" and bool(self.data.path or ev.data_path or demo_data)

    def resolved(self, has_reference: bool, graded: bool = False) -> FedTLConfig:
        """This config with the server's automatic choices made concrete; the server resolves them once and tells
        every site.

        - ``model.pooling = auto``: the mean, std and quadrant pooling when the head will train on standardized
          features (:attr:`standardizes`, and the server has validation data or the sites' statistics:
          :mod:`fedtl.federation.site_stats`), the spatial mean otherwise —
          unstandardized, the richer features measured worse than the mean (docs/benchmarks.md, "Richer pooling with
          standardized training").
        - ``model.head = auto``: the ordinal head when the labels are graded (``graded``: :meth:`graded_labels`), the
          linear head otherwise. Graded labels are a fact about the task, like the class count: one score and
          cut points spend each clipped gradient on one direction (docs/benchmarks.md, "Graded classes")."""
        cfg = self
        if cfg.model.pooling == "auto":
            cfg = replace(cfg, "model", pooling="avg-std-grid" if has_reference and cfg.standardizes else "avg")
        if cfg.model.head == "auto":
            cfg = replace(cfg, "model", head="ordinal" if graded else "linear")
        return cfg

    def graded_labels(self, source_path: str | Path | None = None, num_classes: int = 0) -> bool:
        """Whether the classes are ordered grades: ``data.labels``, or with ``auto`` what the server's data declare —
        MedMNIST's task type for a file it distributes (``source_path``, default ``data.path`` or the bundled data;
        :func:`fedtl.data.sources.medmnist_task`). Image folders declare nothing: set ``data.labels = graded``."""
        if self.data.labels != "auto":
            return self.data.labels == "graded"
        from fedtl.data.sources import medmnist_task, resolve_data_path

        path = source_path if source_path is not None else resolve_data_path(self.data.path)
        return medmnist_task(path, num_classes) == "ordinal-regression"

    def simulated(self) -> FedTLConfig:
        """:meth:`resolved` as ``fedtl simulate``'s server decides it: its bundled data counts as validation data."""
        return self.resolved(self.has_reference(demo_data=True), graded=self.graded_labels())

    @property
    def standardizes(self) -> bool:
        """Whether the head trains on standardized features when the server has validation data: ``train.standardize
        = server`` and no per-sample layernorm (fedtl.standardize)."""
        return self.train.standardize == "server" and self.model.feature_norm == "none"

    @property
    def train_views(self) -> int:
        """Views per training image: ``train.views``, or with 0 (auto) 4 for the head-only suffix and 1 with adapters
        (their inputs are feature maps, not cached per view). Chosen on validation AUC: docs/benchmarks.md,
        "Augmentation multiplicity"."""
        return self.train.views or (AUTO_VIEWS if self.adapters.kind == "none" else 1)

    @property
    def eval_views(self) -> int:
        """Test-time views per image: ``evaluation.views``, or with 0 (auto) the training views. The suffix is trained
        on the mean prediction over shifted views; scoring it the same way raised test AUC and accuracy on both data
        sets (docs/benchmarks.md, "Test-time views")."""
        return self.evaluation.views or self.train_views

    # ---- flat kebab-case view (Flower's run config) -------------------------------------
    @staticmethod
    def known_keys() -> dict[str, type]:
        keys: dict[str, type] = {}
        for section, cls in _SECTIONS.items():
            for f in fields(cls):
                keys[f"{section}.{f.name.replace('_', '-')}"] = field_type(cls, f.name)
        return keys

    def to_run_config(self) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for section in _SECTIONS:
            for f in fields(getattr(self, section)):
                flat[f"{section}.{f.name.replace('_', '-')}"] = getattr(getattr(self, section), f.name)
        return flat

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], *, ignore: tuple[str, ...] = ()) -> FedTLConfig:
        """Build a config from Flower's flat mapping; unknown keys are an error.

        ``ignore`` lists key prefixes that belong to someone else (e.g. Flower's own keys).
        """
        known = cls.known_keys()
        values: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
        for key, raw in run_config.items():
            if any(key.startswith(p) for p in ignore):
                continue
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                hint = f"; did you mean `{close[0]}`?" if close else "."
                raise ConfigError(f"Unknown config key `{key}`{hint} Known keys: {', '.join(sorted(known))}")
            section, name = key.split(".", 1)
            values[section][name.replace("-", "_")] = coerce(key, raw, known[key])
        return cls(**{s: _SECTIONS[s](**v) for s, v in values.items()})

    def with_overrides(self, overrides: Mapping[str, Any]) -> FedTLConfig:
        merged = self.to_run_config()
        merged.update(overrides)
        return FedTLConfig.from_run_config(merged)


def replace(cfg: FedTLConfig, section: str, **changes: Any) -> FedTLConfig:
    """Return ``cfg`` with some fields of one section changed (validated again)."""
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})
