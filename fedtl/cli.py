"""The ``fedtl`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tomllib
from pathlib import Path

from fedtl.config import FedTLConfig, parse_assignment
from fedtl.errors import ConfigError, DataError, FedTLError

log = logging.getLogger("fedtl")


def _load_config(args: argparse.Namespace) -> FedTLConfig:
    values: dict = {}
    if getattr(args, "config", None):
        values.update(_flatten(_read_toml(Path(args.config))))
    for item in getattr(args, "set", None) or []:
        key, value = parse_assignment(item)
        values[key] = value
    shortcuts = {"federation.sites": getattr(args, "sites", None), "federation.rounds": getattr(args, "rounds", None),
                 "privacy.target-epsilon": getattr(args, "epsilon", None), "data.path": getattr(args, "data", None)}
    values.update({k: v for k, v in shortcuts.items() if v is not None})
    if getattr(args, "no_dp", False):
        values["privacy.enabled"] = False
    return FedTLConfig.from_run_config(values)


def _read_toml(path: Path) -> dict:
    """A ``--config`` file's tables; every way it can be unreadable is a one-line ConfigError."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"Config file {path} does not exist.") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"Config file {path} is a folder; pass the path of a TOML file.") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Config file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                          f"{exc.start}); save it as UTF-8.") from exc
    except OSError as exc:
        raise ConfigError(f"Config file {path} cannot be read ({exc.strerror or exc}).") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Config file {path} is not valid TOML: {exc}.") from exc


def _flatten(data: dict, prefix: str = "") -> dict:
    """Accept both ``[privacy] target-epsilon = 3`` tables and flat ``"privacy.target-epsilon" = 3``."""
    flat = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, full + "."))
        else:
            flat[full] = value
    return flat


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedtl.federation.supervisor import CHILD_ENV, resumed_config, supervise

    if args.resume and (args.out or args.overwrite or args.config or args.set or args.no_dp
                        or any(v is not None for v in (args.sites, args.rounds, args.epsilon, args.data))):
        raise ConfigError("--resume takes the run directory alone: the run continues with its own config.json.")
    if not args.resume and not args.out:
        raise ConfigError("simulate needs --out RUN_DIR (a new run) or --resume RUN_DIR (an interrupted one).")
    out = Path(args.resume or args.out)
    cfg = resumed_config(out) if args.resume else _load_config(args)  # bad config: refused before any process starts
    if os.environ.get(CHILD_ENV) != "1" and not args.in_process:
        return supervise(args.argv, out)
    from fedtl.federation.simulation import simulate

    summary = simulate(cfg, out, overwrite=args.overwrite, resume=bool(args.resume), ray_address=args.ray_address)
    keys = ("test_auc", "test_acc", "selected_round", "rounds", "sites", "epsilon_max", "bytes_up_per_round",
            "bytes_per_site_round", "full_model_bytes", "wall_seconds", "cache_hit")
    print(json.dumps({k: summary.get(k) for k in keys}, indent=1))
    print(f"run directory: {out}")
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    from fedtl.backbones import available, get_spec

    for name in available():
        s = get_spec(name)
        print(f"{name:20s} {s.library:12s} features={s.feature_dim:5d} input={s.input_size} weights={s.weights_file}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    for key, value in cfg.to_run_config().items():
        print(f"{key} = {json.dumps(value)}")
    return 0


def cmd_site_check(args: argparse.Namespace) -> int:
    """Load a site's config and data offline; report classes, images read and every unreadable file."""
    from fedtl.data.site_sources import load_site_data
    from fedtl.site_config import SiteConfig

    site = SiteConfig.load(args.config)
    missing = site.missing_files()
    print(f"site: {site.name} ({args.config})")
    print(f"data: {site.data.format} {site.data.path}" + (f" (labels {site.data.labels})" if site.data.labels else ""))
    for key, path in missing:
        print(f"missing file: `{key}` = {path}")
    result = load_site_data(site.data, allow_empty=True)
    print(f"images read: {len(result.images)} of {result.listed} listed, {site.data.image_size}x{site.data.image_size} grayscale")
    for index, (name, count) in enumerate(result.class_counts().items()):
        print(f"  class {index} {name}: {count}")
    print(f"unreadable: {len(result.problems)}")
    for problem in result.problems:
        print(f"  {problem.file}: {problem.reason}")
    if len(result.images) == 0:
        print(f"error: no image could be read from {site.data.path}; see the unreadable files above.", file=sys.stderr)
        return DataError.exit_code
    if missing:
        keys = ", ".join(f"`{key}`" for key, _ in missing)
        print(f"error: {len(missing)} configured file(s) do not exist ({keys}); fix the paths in {args.config}.", file=sys.stderr)
        return DataError.exit_code
    if result.problems and not args.allow_bad:
        print(f"error: {len(result.problems)} of {result.listed} listed entries are unreadable (named above); fix them "
              "or remove them from the labels CSV, or pass --allow-bad to accept a site that skips them.", file=sys.stderr)
        return DataError.exit_code
    return 0


def cmd_site_ledger(args: argparse.Namespace) -> int:
    """Print a site's privacy ledger (verified) and its ε recomputed under both accountants."""
    from fedtl.privacy import read_ledger
    from fedtl.privacy.accounting import epsilon_of
    from fedtl.privacy.policy import policy_for_site
    from fedtl.site_config import SiteConfig

    site = SiteConfig.load(args.config)
    policy = policy_for_site(site)
    ledger = read_ledger(policy.ledger_path)  # verifies the hash chain and the anchor
    print(f"site: {site.name}  ledger: {policy.ledger_path}")
    print(f"policy: budget ε={policy.target_epsilon:g} at δ={policy.delta:g}, accountant {policy.accountant}, "
          f"per run ≤ {policy.run_cap:g}, per round ≤ {policy.round_cap:g}, max σ {policy.max_noise_multiplier:g}")
    print(f"ledger: δ={ledger.delta:g}, accountant {ledger.accountant}, {len(ledger.entries)} round(s), chain verified")
    print(f"{'#':>3} {'run':24} {'round':>5} {'sigma':>8} {'q':>8} {'steps':>6} {'eps after':>9}  time")
    import time as _time

    for i, e in enumerate(ledger.entries, 1):
        when = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(e["time"]))
        print(f"{i:>3} {e['run'][:24]:24} {e['round']:>5} {e['noise_multiplier']:>8.3f} {e['sample_rate']:>8.4f} "
              f"{e['steps']:>6} {e['epsilon']:>9.4f}  {when}")
    history = ledger.history
    rdp = epsilon_of(history, ledger.delta, "rdp")
    prv = epsilon_of(history, ledger.delta, "prv")
    print(f"epsilon (recomputed from the history at δ={ledger.delta:g}): rdp {rdp:.4f}, prv {prv:.4f}; "
          f"budget {policy.target_epsilon:g}, remaining {max(0.0, policy.target_epsilon - (rdp if ledger.accountant == 'rdp' else prv)):.4f} "
          f"({ledger.accountant})")
    if args.json:
        print(json.dumps({"site": site.name, "entries": ledger.entries, "epsilon_rdp": rdp, "epsilon_prv": prv,
                          "delta": ledger.delta, "accountant": ledger.accountant, "budget": policy.target_epsilon}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtl", description="Federated transfer learning: frozen prefix, private suffix.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (Flower's round log)")
    sub = parser.add_subparsers(dest="command", required=True)

    def config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="TOML file with settings (tables or flat dotted keys)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting, e.g. privacy.target-epsilon=3")
        p.add_argument("--sites", type=int, help="shortcut for federation.sites")
        p.add_argument("--rounds", type=int, help="shortcut for federation.rounds")
        p.add_argument("--epsilon", type=float, help="shortcut for privacy.target-epsilon")
        p.add_argument("--data", help="shortcut for data.path (a MedMNIST-format .npz)")
        p.add_argument("--no-dp", action="store_true", help="train without differential privacy (for comparison)")

    p = sub.add_parser("simulate", help="run N sites through Flower's simulation runtime")
    config_args(p)
    p.add_argument("--out", help="run directory to create (summary.json, metrics.jsonl, suffix.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="run the sites on an existing Ray cluster (`auto`, HOST:PORT or ray://HOST:PORT; default "
                        "$RAY_ADDRESS, else a private Ray instance on this machine)")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # no supervisor (tests, debugging)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("config", help="print the resolved configuration")
    config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("backbones", help="list registered backbones")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("site", help="data-site commands (a site's own TOML policy file)")
    site_sub = p.add_subparsers(dest="site_command", required=True)
    p = site_sub.add_parser("check", help="load the site config and its data offline; report classes and unreadable files")
    p.add_argument("config", help="the site's TOML file (name, data, privacy, tls, auth)")
    p.add_argument("--allow-bad", action="store_true",
                   help="exit 0 even when listed files are unreadable (they are still named; training skips them)")
    p.set_defaults(func=cmd_site_check)
    p = site_sub.add_parser("ledger", help="print the site's privacy ledger and its ε recomputed under rdp and prv")
    p.add_argument("config", help="the site's TOML file")
    p.add_argument("--json", action="store_true", help="also print one JSON line")
    p.set_defaults(func=cmd_site_ledger)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedtl").setLevel(logging.INFO)
    logging.getLogger("flwr").propagate = False  # Flower prints through its own handler
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        return args.func(args)
    except FedTLError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
