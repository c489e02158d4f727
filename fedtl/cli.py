"""The ``fedtl`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tomllib
from pathlib import Path

from fedtl.config import FedTLConfig
from fedtl.config_values import parse_assignment
from fedtl.data.site_sources import DEFAULT_IMAGE_SIZE
from fedtl.errors import ConfigError, DataError, FedTLError
from fedtl.site_commands import cmd_site_check, cmd_site_ledger
from fedtl.site_config import DEFAULT_MAX_PIXELS

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
    from fedtl.report import write_report

    report = write_report(out)
    print_summary(summary)
    print(f"run directory: {out} (report: {report})")
    return 0


def print_summary(summary: dict) -> None:
    """The run's headline in a few lines, and each site's figures for the selected suffix."""
    def f(v, d=4):
        return "–" if v is None else f"{v:.{d}f}"

    ev, dec = summary.get("evaluation") or {}, summary.get("decision") or {}
    rule = {"threshold": lambda: f"threshold {dec['threshold']:.2f}", "bias": lambda: "per-class offsets"}.get(
        dec.get("rule"), lambda: "argmax")()
    print(f"test AUC {f(summary.get('test_auc'))}, accuracy {f(summary.get('test_acc'))} ({rule}; argmax "
          f"{f(summary.get('test_acc_argmax'))}) — {ev.get('headline', '')}, round {summary.get('selected_round')} "
          f"of {summary.get('rounds')} selected by {ev.get('selected_by', '')} validation")
    eps = summary.get("epsilon_max")
    print(f"privacy: max ε {f(eps, 2)} of {summary.get('target_epsilon')} (δ={summary.get('delta')}) | "
          f"{summary.get('bytes_per_site_round')} bytes per site per round | {summary.get('wall_seconds')} s, "
          f"cache {'hit' if summary.get('cache_hit') else 'built'}")
    table = summary.get("per_site") or {}
    sites = table.get("sites") or {}
    if sites:
        print(f"{'site':<14}{'test n':>7}{'AUC':>8}{'acc':>8}{'argmax':>8}")  # acc: at the run's decision rule
        for name, row in list(sites.items())[:12]:
            print(f"{name[:14]:<14}{row.get('test_n', 0):>7}{f(row.get('test_auc')):>8}{f(row.get('test_acc')):>8}"
                  f"{f(row.get('test_acc_argmax')):>8}")
        if len(sites) > 12:
            print(f"… and {len(sites) - 12} more sites (summary.json, report.html)")
        from fedtl.evaluation import sites_auc

        pooled = table.get("pooled") or {}  # AUC over all the sites' images (their mean AUC: summary.json)
        print(f"{'pooled':<14}{pooled.get('test_n', 0):>7}{f(sites_auc(pooled, 'test', '')):>8}"
              f"{f(pooled.get('test_acc')):>8}{f(pooled.get('test_acc_argmax')):>8}")


def cmd_plan(args: argparse.Namespace) -> int:
    from fedtl.planning import format_plans, params_reason, plan_simulation, plan_sizes, run_params

    cfg = _load_config(args)
    if args.site_sizes:
        try:
            sizes = [int(x) for x in args.site_sizes.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--site-sizes must be comma-separated image counts, got {args.site_sizes!r}.") from None
        if not sizes or min(sizes) < 1:
            raise ConfigError(f"--site-sizes must be positive image counts, got {args.site_sizes!r}.")
        from fedtl.federation.site import build_transfer_model

        model = build_transfer_model(cfg.resolved(cfg.has_reference(), cfg.graded_labels()),
                                     cfg.model.num_classes or 2)  # a deployment's
        params = run_params(model, cfg)
        trainable = model.param_counts()["trainable_params"]
        plans = plan_sizes(cfg, sizes, params)
    else:
        plans, params, trainable = plan_simulation(cfg)
    for line in format_plans(plans, params, cfg.federation, trainable=trainable, why=params_reason(cfg)):
        print(line)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedtl.report import write_report

    print(write_report(args.run_dir, args.out))
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


def cmd_predict(args: argparse.Namespace) -> int:
    """Class probabilities and a label for each image file, from a finished run's model."""
    from fedtl.inference import check_run_dir, collect_inputs, load_run, predict_images, read_inputs, write_csv

    check_run_dir(args.run_dir)
    files, problems = collect_inputs(args.inputs)
    read, images, bad = read_inputs(files, args.image_size, args.max_pixels)  # before the model: bad input fails fast
    for problem in problems + bad:
        print(f"skipped {problem.file}: {problem.reason}", file=sys.stderr)
    if not read:
        print(f"error: no file could be predicted ({len(problems + bad)} unreadable or missing, named above).",
              file=sys.stderr)
        return DataError.exit_code
    run = load_run(args.run_dir, args.suffix)
    pred = predict_images(run, read, images, problems + bad)
    out = Path(args.out) if args.out else None
    write_csv(pred.csv_rows(), out)
    print(f"predicted {len(pred.files)} file(s), skipped {len(pred.problems)}; decision: {run.decision.describe()}; "
          f"round {run.metadata.get('round', '?')} of {run.run_dir}" + _personal_note(run)
          + (f"; wrote {out}" if out else ""), file=sys.stderr)
    return 0


def _personal_note(run) -> str:
    m = run.metadata
    if "personal" not in m:
        return ""
    if m["kept"] == "tuned":
        kept = "the global suffix with its local head" if m.get("personalization") == "local-head" else \
            "its fine-tuned suffix"
    else:
        kept = "the global suffix: its validation split showed no gain from a personal one"
    private = "" if m["dp"] == "true" else "; trained without DP: keep it and its exports at the site"
    return f", personal suffix of site {m['site']} ({kept}{private})"


def cmd_export(args: argparse.Namespace) -> int:
    """One self-contained ONNX / TorchScript file, checked against `fedtl predict` before it is kept."""
    from fedtl.export import export_run
    from fedtl.inference import collect_inputs, load_run, read_inputs

    if args.check_count < 1:
        raise ConfigError(f"--check-count must be >= 1, got {args.check_count}.")
    run = load_run(args.run_dir, args.suffix)
    if args.check:
        files, missing = collect_inputs(args.check)
        _, images, bad = read_inputs(files, args.image_size)
        for problem in missing + bad:
            print(f"skipped {problem.file}: {problem.reason}", file=sys.stderr)
        where = f"{len(images)} image(s) from --check"
    else:
        from fedtl.data.sources import load_medmnist, resolve_data_path

        if not run.config.data.path and (Path(args.run_dir) / "summary.json").is_file() and str(
                json.loads((Path(args.run_dir) / "summary.json").read_text()).get("evaluation", {}).get("server_data", "")
        ).startswith("none"):
            raise ConfigError("This run's server held no images (federated evaluation), so there is no test split to "
                              "check the export on: pass images of the task with --check FILE_OR_FOLDER.")
        path = resolve_data_path(run.config.data.path)
        try:
            test = load_medmnist(path, require=("test",)).test
        except DataError as exc:
            raise DataError(f"The run's test data cannot be read to check the export ({exc}); pass images with "
                            "--check FILE_OR_FOLDER.") from exc
        images = test.images[: args.check_count]
        where = f"{len(images)} test image(s) of {path.name}"
    report = export_run(run, args.format, args.out, images)
    r = run.resolution
    print(f"wrote {report.path} ({report.format}, {report.bytes:,} bytes = {report.bytes / 1e6:.2f} MB)"
          + _personal_note(run))
    print(f"input: `image` float32 (N, 3, {r}, {r}) in [0, 1] (grayscale repeated to 3 channels); outputs: "
          f"`probabilities` float32 (N, {run.num_classes}), `label` int64 (N,) by decision {run.decision.describe()}")
    print(f"checked on {where}: max |difference| to `fedtl predict` {report.max_abs_diff:.2e} (allowed 1e-4); "
          f"labels agree on {report.labels_agree} of {report.checked_images}")
    print(f"CPU latency: {report.latency_ms:.2f} ms per image (batch 1, one thread, median of 30)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtl", description="Federated transfer learning: frozen prefix, private suffix.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's own logs too")
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

    p = sub.add_parser("plan", help="predict each site's noise multiplier, ε per round and noise-to-signal ratio")
    config_args(p)
    p.add_argument("--site-sizes", metavar="N,N,…", help="plan sites of these sizes (e.g. a deployment's) instead of "
                   "the simulation's partitions")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("report", help="write RUN_DIR/report.html: figures per round, per-site results, privacy spent")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (fedtl simulate --out, or a deployment's output.dir)")
    p.add_argument("--out", help="the HTML file to write (default RUN_DIR/report.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("config", help="print the resolved configuration")
    config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("backbones", help="list registered backbones")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("predict", help="class probabilities and a label per image (PNG, JPEG, DICOM) from a finished run")
    p.add_argument("run_dir", help="a finished run directory (config.json, suffix.safetensors)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    p.add_argument("--out", help="CSV to write (default: stdout): file, prob_0..prob_{C-1}, label (and label_name when the run has model.class-names)")
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                   help="square size images are read at, as a site's data.image-size (default %(default)s)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="larger images are skipped unread, as a site's data.max-pixels (default %(default)s)")
    p.add_argument("--suffix", metavar="PERSONAL_SUFFIX",
                   help="a site's personal-suffix.safetensors of this run (personalization), used instead of the "
                        "run's suffix, with the decision rule the site chose on its validation split")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="one self-contained ONNX / TorchScript model from a finished run, checked")
    p.add_argument("run_dir", help="a finished run directory (config.json, suffix.safetensors)")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    p.add_argument("--out", required=True, help="the model file to write (never left half-written)")
    p.add_argument("--check", nargs="+", metavar="INPUT",
                   help="images to check the export on (default: the run's test split, from config.json's data.path)")
    p.add_argument("--check-count", type=int, default=64, help="test images to check on (default %(default)s)")
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                   help="square size --check images are read at (default %(default)s)")
    p.add_argument("--suffix", metavar="PERSONAL_SUFFIX",
                   help="export a site's personal-suffix.safetensors of this run instead of the run's suffix")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("site", help="data-site commands (a site's own TOML policy file)")
    site_sub = p.add_subparsers(dest="site_command", required=True)
    p = site_sub.add_parser("check", help="load the site config and its data offline; report classes, unreadable "
                                          "files and the site's privacy plan")
    p.add_argument("config", help="the site's TOML file (name, data, privacy, tls, auth)")
    p.add_argument("--rounds", type=int, help="plan a run of this many rounds (default: the default run's)")
    p.add_argument("--batch-size", type=int, help="plan this expected batch size (default: the default run's)")
    p.add_argument("--graded", action="store_true",
                   help="plan for graded classes (the ordinal head a run with data.labels = graded trains); image "
                        "folders declare nothing, so without it the plan is for the linear head")
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
    if args.verbose:
        os.environ["FEDTL_VERBOSE"] = "1"  # also for `fedtl simulate`'s supervised child
    from fedtl.federation.logs import quiet_flower

    quiet_flower(args.verbose)
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
