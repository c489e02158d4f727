"""``fedtl simulate``: N sites through Flower's simulation runtime, in this process tree."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from fedtl.config import FedTLConfig
from fedtl.errors import ConfigError, FederationError
from fedtl.federation.server import prepare_run_dir, resume_hint
from fedtl.federation.supervisor import ProcessTreeWatcher
from fedtl.federation.site import build_transfer_model, load_source
from fedtl.federation.tracking import jsonable

log = logging.getLogger(__name__)


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory.")
    parent = next(p for p in (out, *out.absolute().parents) if p.exists())  # the folder it will be created in
    if not parent.is_dir():
        raise ConfigError(f"--out {out} cannot be created: {parent} is a file, not a folder.")
    try:  # create and remove a probe where the run will be written: permissions, read-only or pseudo file systems
        os.rmdir(tempfile.mkdtemp(prefix=".fedtl-probe-", dir=parent))
    except OSError as exc:
        raise ConfigError(f"--out {out} cannot be written: {parent} refuses new entries ({exc.strerror}).") from exc
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"Run directory {out} already exists and is not empty; choose another --out or pass --overwrite.")


def simulate(cfg: FedTLConfig, out: str | Path, *, overwrite: bool = False, resume: bool = False,
             ray_address: str | None = None) -> dict:
    """Run the federation in simulation and return ``summary.json``'s content.

    Everything that bad input can break (config, data file, backbone weights, output folder)
    is checked before anything is written. With ``resume``, ``out`` is an interrupted run: it
    continues from its last checkpoint (its own ``config.json`` is the configuration).
    ``ray_address`` (default ``$RAY_ADDRESS``): an existing Ray cluster to run the sites on (see
    :func:`backend_config`); empty: a private Ray instance on this machine, stopped afterwards.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if resume:
        from fedtl.federation.server import load_for_resume

        load_for_resume(out, cfg)  # a completed run, no checkpoint or another config: refused before anything
    else:
        check_out_dir(out, overwrite)
    source = load_source(cfg.data.path)
    from fedtl.federation.site import eval_features, site_indices, train_features

    for s in range(cfg.federation.sites):  # partitions: fail early on an impossible split
        site_indices(cfg, s, cfg.federation.sites)
    resolved = cfg.simulated()  # the pooling the ServerApp will decide on
    model = build_transfer_model(resolved, source.num_classes)
    # every cache entry the sites and the server will read, built here once (not by each site's process at once)
    hits = [train_features(resolved, model)[1],
            *(eval_features(resolved, model, split)[1] for split in (source.val, source.test))]
    if not resume:
        prepare_run_dir(out, overwrite=overwrite)
    cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(out), resume=resume))
    if cfg.privacy.enabled:
        _check_plan_in_background(cfg)
    watcher = ProcessTreeWatcher()
    watcher.start()
    try:
        _run_flower(cfg, os.environ.get("RAY_ADDRESS", "") if ray_address is None else ray_address)
    finally:
        _shutdown_ray()
        watcher.stop_and_reap()
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        hint = resume_hint(out) if (out / "checkpoint.safetensors").exists() else ""
        raise FederationError(f"The simulation ended without writing {summary_path}; see the log above. {hint}")
    summary = json.loads(summary_path.read_text())
    summary["cache_hit"] = bool(all(hits) and summary.get("cache_hit", True))
    summary["wall_seconds"] = round(time.perf_counter() - t0, 2)
    tmp = summary_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(jsonable(summary), indent=1))
    tmp.replace(summary_path)
    return summary


def _check_plan_in_background(cfg: FedTLConfig) -> None:
    """The plan's check (``fedtl plan``, without its alternatives): warn before the first round when sites will
    send noise. It runs beside Ray's start-up (one noise calibration per site, about a second of CPU each on
    this project's 2-core machine); a failure of the check never stops the run."""
    import threading

    def check() -> None:
        try:
            from fedtl.planning import run_params, plan_sizes, warnings_for
            from fedtl.federation.site import site_indices

            resolved = cfg.simulated()
            model = build_transfer_model(resolved, load_source(cfg.data.path).num_classes)
            sizes = [len(site_indices(cfg, s, cfg.federation.sites)) for s in range(cfg.federation.sites)]
            plans = plan_sizes(cfg, sizes, run_params(model, cfg), advise=False)
            for line in warnings_for(plans, cfg.federation):
                log.warning("Plan: %s", line)
        except Exception as exc:  # advice only
            log.debug("The plan check failed: %s", exc)

    threading.Thread(target=check, name="fedtl-plan-check", daemon=True).start()


def backend_config(cfg: FedTLConfig, ray_address: str = "") -> dict:
    """Flower's simulation backend settings: each site an actor needing one CPU; Ray's ``init_args``.

    Without ``ray_address`` Ray starts privately on this machine with at most one CPU per site. With one
    (``auto``, ``127.0.0.1:6379``, ``ray://host:10001``) the driver joins that cluster (``ray.init(address=…)``,
    through Flower's ``init_args``) and uses the cluster's own resources: a study that outgrows one machine runs
    its sites on every node of the cluster. Each node needs fedtl installed (``pip install -e .``) and the
    data and weights paths of the run config.
    """
    if ray_address:
        init_args = {"address": ray_address, "logging_level": "error"}  # the cluster's CPUs, not ours
    else:
        cpus = max(1, min(os.cpu_count() or 1, cfg.federation.sites))
        init_args = {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False, "logging_level": "error"}
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}


def _run_flower(cfg: FedTLConfig, ray_address: str = "") -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation

    from fedtl.federation.apps import make_client_app, make_server_app

    if ray_address:
        log.info("Running the sites on the Ray cluster at %s", ray_address)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*run_simulation.*deprecated.*")
        # simulated sites share this machine's weights: nothing to distribute
        run_simulation(server_app=make_server_app(cfg, distribute_backbone=False), client_app=make_client_app(cfg, threads=1),
                       num_supernodes=cfg.federation.sites, backend_config=backend_config(cfg, ray_address))


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
