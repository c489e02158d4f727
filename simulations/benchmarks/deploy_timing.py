"""Wall time of a deployed round: the loopback TLS deployment of tests/e2e/test_deployment_tls.py, timed.

    python simulations/benchmarks/deploy_timing.py [--rounds 5] [--keep DIR] [--env KEY=VALUE ...]

Starts a SuperLink (``server.ops``: TLS, SuperNode authentication) and three data sites with the site launcher as
a real site does (``python -m clients.site start site.toml …``: its long-lived site worker, then its SuperNode;
``--no-worker``: the SuperNode alone; 100 PneumoniaMNIST training images each, budgets ε = 3 / 2 / 0.05 at
δ = 1e-5, so the third declines every round), with warm caches: every site's prefix features and the
server's validation/test features are computed before the run starts. Then ``flwr run`` of ``--rounds``
rounds, and prints ONE JSON line:

- ``round_seconds``: each round's wall time from ``metrics.jsonl`` (round 0: until the initial evaluation);
  ``median_s``: the median of rounds 2..N;
- ``steps``: the median over rounds 2..N of each step of the round's critical path (the site whose reply
  came last), from timestamps taken in every ``flwr-clientapp`` / ``flwr-serverapp`` process:
  ``dispatch`` (ServerApp sends → the site's ClientApp process starts: SuperNode pull, SuperExec poll, spawn),
  ``start_to_call`` (process start → ClientApp called: interpreter, Flower, imports, the message),
  ``call_to_first_step`` (→ first training step: config, model, data, ledger, noise plan),
  ``train``, ``after_train`` (→ the ClientApp returns: ledger and release saved), ``reply`` (→ the ServerApp
  has every reply: Flower's pushes and polls) and ``server`` (→ the next round is sent: aggregation,
  evaluation, checkpoint);
  With site workers the ClientApp process forwards the message and its worker trains: ``call_to_first_step`` is
  then ClientApp called → the worker's first step (``call_to_worker``: → the worker's handler starts, i.e. the
  socket round trip), ``train`` and ``after_train`` are the worker's, timestamps from the same clock;
- ``start_to_first_step``: per trained site and round 2..N, ClientApp process start → first training step (in
  the worker when there is one);
- ``train_messages``: medians over the trained sites of rounds 2..N of a train message's CPU seconds in its
  ClientApp process (``clientapp_cpu``: the whole process) and in the site worker (``worker_cpu``: the request);
  ``served_by_worker``: ClientApp messages the worker served (``clientapp_messages``: all of them);
- ``per_round``: those steps for each round and site; ``load``: ``/proc/loadavg`` before and after.

Every process it starts is stopped on return, failure, Ctrl-C or SIGTERM (the SuperLink, the SuperNodes and
every process they started, found by an environment marker). The timestamps come from a ``sitecustomize``
placed on the PYTHONPATH of the deployment's processes only (the site worker writes one line per request it
serves); nothing in fedtl is changed to take them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SITES = (("hospital-a", 1, 3.0), ("hospital-b", 2, 2.0), ("hospital-c", 3, 0.05))
CONNECTION = "fedtl-bench"

# The ``sitecustomize`` placed on the deployment's PYTHONPATH (a file of its own, copied as it is).
PROBE = (Path(__file__).resolve().parent / "deploy_timing_probe.py").read_text()




def _loadavg() -> list[str]:
    try:
        return Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return []


def _marked(marker: str) -> list:
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get("FEDTL_BENCH_MARKER") == marker:
                found.append(p)
        except psutil.Error:
            continue
    return found


def _warm_caches(work: Path, sites: dict[str, Path], server_data: Path) -> None:
    """Every site's prefix features (its own cache) and the server's validation/test features."""
    from fedtl.config import FedTLConfig
    from fedtl.federation.deployment import deployed_site_data
    from fedtl.federation.site import build_transfer_model, eval_features, load_source

    cfg = FedTLConfig.from_run_config({"data.path": str(server_data)}).resolved(has_reference=True)
    model = build_transfer_model(cfg, 2)
    for path in sites.values():
        deployed_site_data(cfg, model, str(path))
    source = load_source(str(server_data))
    for split in (source.val, source.test):
        eval_features(cfg, model, split, progress=False)


def _with_worker(clients: list[dict], served: list[dict]) -> list[dict]:
    """ClientApp records completed with the site worker's (same site, round and message type): its first step and
    train end, and ``worker_call`` (the worker's handler starts) / ``worker_cpu`` (its CPU seconds)."""
    by_key = {(w.get("site"), w.get("round"), w.get("type")): w for w in served}
    out = []
    for c in clients:
        w = by_key.get((c.get("site"), c.get("round"), c.get("type")))
        if w is not None:
            c = dict(c, worker_call=w["call"], worker_cpu=w.get("cpu"),
                     **{k: w[k] for k in ("first_step", "train_end") if k in w})
        out.append(c)
    return out


def _steps(server: dict, clients: list[dict], rounds: int) -> dict:
    """Per round and site: the critical path's steps (see the module notes)."""
    sends = {int(r): v for r, v in server.get("rounds", {}).items()}
    out = {}
    for rnd in range(1, rounds + 1):
        if rnd not in sends:
            continue
        send, replies = sends[rnd]["send"], sends[rnd].get("replies")
        nxt = sends.get(rnd + 1, {}).get("send") or server.get("exit")
        sites = {}
        for c in clients:
            if c.get("round") != rnd or "call" not in c or c.get("type", "train") != "train":  # not evaluate
                continue
            name = Path(c.get("site", "?")).parent.name
            step = {"dispatch": c["start"] - send, "start_to_call": c["call"] - c["start"]}
            if "first_step" in c:
                step.update(call_to_first_step=c["first_step"] - c["call"], train=c["train_end"] - c["first_step"],
                            after_train=c["return"] - c["train_end"], start_to_first_step=c["first_step"] - c["start"])
            else:
                step["declined_call"] = c["return"] - c["call"]
            if "worker_call" in c:
                step["call_to_worker"] = c["worker_call"] - c["call"]
                step["worker_cpu"] = c.get("worker_cpu")
            step["clientapp_cpu"] = c.get("cpu")
            step["returned"] = c["return"] - send
            step["imported"] = c.get("imported", [])
            sites[name] = step
        if not sites:
            continue
        last = max(sites, key=lambda s: sites[s]["returned"])
        critical = dict(sites[last], site=last)
        if replies:
            critical["reply"] = replies - send - sites[last]["returned"]
        if replies and nxt:
            critical["server"] = nxt - replies
        out[rnd] = {"critical": critical, "sites": sites}
    return out


def run(args: argparse.Namespace) -> dict:
    import psutil  # noqa: F401 - fail early: the clean-up needs it

    import tomli_w

    from clients import site as site_launcher
    from fedtl.data.sources import write_medmnist_sample
    from server import ops
    from server.processes import free_loopback_ports

    work = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="deploy-timing-"))
    work.mkdir(parents=True, exist_ok=True)
    probe_dir = work / "probe"
    probe_dir.mkdir(exist_ok=True)
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    timing_log = work / "timing.jsonl"
    timing_log.unlink(missing_ok=True)
    marker = uuid.uuid4().hex
    code_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FEDTL_BENCH_MARKER=marker, FLWR_HOME=str(work / "flwr"),
               FEDTL_CACHE_DIR=str(work / "cache"), PYTHONPATH=os.pathsep.join((str(probe_dir), code_path)),
               FEDTL_TIMING_LOG=str(timing_log))
    env.update(getattr(site_launcher, "SUPERNODE_ENV", {}))  # what the site launcher sets, if anything
    env.update(dict(kv.split("=", 1) for kv in args.env))
    os.environ["FEDTL_CACHE_DIR"] = env["FEDTL_CACHE_DIR"]

    certs = ops.make_ca_and_server_cert(work / "certs")
    port, control = free_loopback_ports(2)
    flwr_home = work / "flwr"
    ops.write_connection(flwr_home, CONNECTION, f"127.0.0.1:{control}", certs.ca_cert)
    sites: dict[str, Path] = {}
    keys = {}
    for name, seed, epsilon in SITES:
        folder = work / "sites" / name
        folder.mkdir(parents=True)
        images = write_medmnist_sample(folder / "images.npz", 100, 8, 8, seed)
        keys[name] = ops.make_site_keypair(work / "keys", name)
        body = {"name": name, "state-dir": str(folder / "state"),
                "data": {"format": "medmnist", "path": str(images), "image-size": 28},
                "privacy": {"target-epsilon": epsilon, "delta": 1e-5},
                "tls": {"ca-cert": str(certs.ca_cert)},
                "auth": {"private-key": str(keys[name][0]), "public-key": str(keys[name][1])}}
        sites[name] = folder / "site.toml"
        sites[name].write_text(tomli_w.dumps(body), encoding="utf-8")
    server_data = write_medmnist_sample(work / "server.npz", 8, 60, 60, 0)
    t0 = time.time()
    _warm_caches(work, sites, server_data)
    warm_s = time.time() - t0
    load_before = _loadavg()

    result: dict = {}
    with contextlib.ExitStack() as stack:
        @stack.callback
        def _stop_everything():  # after every ManagedProcess stopped its tree: whatever still carries the marker
            import psutil

            deadline = time.monotonic() + 20
            while (left := _marked(marker)) and time.monotonic() < deadline:
                time.sleep(0.5)
            for p in left:
                with contextlib.suppress(psutil.Error):
                    p.kill()

        link = ops.ManagedProcess(ops.superlink_command(work / "certs", "127.0.0.1", port, work / "state.db",
                                                        control_address=f"127.0.0.1:{control}"),
                                  work / "logs" / "superlink.log", port=port, env=env, start_timeout=120, cwd=work)
        stack.enter_context(link)
        for i, (name, _, _) in enumerate(SITES):
            ops.register_site(flwr_home, CONNECTION, keys[name][1], name=name)
            (node_port,) = free_loopback_ports(1)
            site_launcher.start_command(sites[name], f"127.0.0.1:{port}", node_port)  # validates the site
            cmd = [sys.executable, "-m", "clients.site", "start", str(sites[name]), "--superlink",
                   f"127.0.0.1:{port}", "--port", str(node_port)] + (["--no-worker"] if args.no_worker else [])
            stack.enter_context(ops.ManagedProcess(cmd, work / "logs" / f"site-{name}.log", env=env,
                                                   port=node_port, start_timeout=300, cwd=work))
        deadline = time.monotonic() + 120
        while {n["status"] for n in ops.list_sites(flwr_home, CONNECTION)} != {"online"}:
            if time.monotonic() > deadline:
                raise RuntimeError("the sites did not come online within 120 s")
            time.sleep(1)
        out = work / "run"
        run_config = (f"federation.sites={len(SITES)} federation.rounds={args.rounds} output.dir='{out}' "
                      f"data.path='{server_data}'")
        flwr = [str(Path(sys.executable).parent / "flwr"), "run", ".", CONNECTION, "--stream", "--run-config",
                run_config]
        t_run = time.time()
        run_proc = stack.enter_context(ops.ManagedProcess(flwr, work / "logs" / "flwr-run.log", env=env, cwd=ROOT))
        code = run_proc.wait(timeout=args.timeout)
        run_wall = time.time() - t_run
        if code != 0 or not (out / "summary.json").exists():
            raise RuntimeError(f"flwr run exited with {code}; log {work / 'logs' / 'flwr-run.log'}: "
                               f"{run_proc.log_text()[-1500:]}")
        time.sleep(2)  # the last ClientApp processes write their timestamps on exit
    result = analyse(out, timing_log, args.rounds)
    result.update({
        "site_worker": not args.no_worker, "flwr_run_wall_s": round(run_wall, 1), "warm_up_s": round(warm_s, 1),
        "load_before": load_before, "load_after": _loadavg(),
        "env": {kv.split("=", 1)[0]: kv.split("=", 1)[1] for kv in args.env},
        "work_dir": str(work) if args.keep else None,
    })
    return result


def analyse(out: Path, timing_log: Path, rounds: int) -> dict:
    """The figures of a finished run from its ``metrics.jsonl`` / ``summary.json`` (``out``) and the probe's log."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds = {r["round"]: r["seconds"] for r in rows}
    round_s = {r: round(seconds[r] - seconds.get(r - 1, 0.0), 2) for r in sorted(seconds)}
    marks = [json.loads(line) for line in timing_log.read_text().splitlines()] if timing_log.exists() else []
    server = next((m for m in marks if m["role"] == "flwr-serverapp" and m.get("rounds")), {})
    clients = _with_worker([m for m in marks if m["role"] == "flwr-clientapp" and "start" in m],
                           [m for m in marks if m["role"] == "site-worker"])
    per_round = _steps(server, clients, rounds)
    later = [r for r in per_round if r >= 2]
    keys_ = ("dispatch", "start_to_call", "call_to_first_step", "train", "after_train", "declined_call", "reply",
             "server")
    steps = {k: round(statistics.median(v), 2) for k in keys_
             if (v := [per_round[r]["critical"][k] for r in later if k in per_round[r]["critical"]])}
    firsts = [s["start_to_first_step"] for r in later for s in per_round[r]["sites"].values()
              if "start_to_first_step" in s]
    trained = [s for r in later for s in per_round[r]["sites"].values() if "start_to_first_step" in s]
    cpu = {k: round(statistics.median(v), 2) for k in ("clientapp_cpu", "worker_cpu", "call_to_worker")
           if (v := [s[k] for s in trained if s.get(k) is not None])}
    summary = json.loads((out / "summary.json").read_text())
    return {
        "rounds": rounds, "sites": len(SITES), "round_seconds": round_s,
        "median_s": round(statistics.median(round_s[r] for r in round_s if r >= 2), 2) if rounds >= 2 else None,
        "steps": steps, "critical_sites": {r: per_round[r]["critical"]["site"] for r in later},
        "start_to_first_step": {"median": round(statistics.median(firsts), 2), "max": round(max(firsts), 2)}
        if firsts else None,
        "clientapp_imports": sorted({m for c in clients if c.get("type") == "train" for m in c.get("imported", [])}),
        "served_by_worker": sum(1 for c in clients if "worker_call" in c), "clientapp_messages": len(clients),
        "train_messages": cpu,  # medians over trained sites, rounds 2..N: CPU s of the ClientApp process, of the worker
        "epsilon": summary.get("epsilon"), "declined": sorted(summary.get("declined", {})),
        "per_round": {r: {s: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in d.items()}
                          for s, d in per_round[r]["sites"].items()} for r in per_round},
    }


def _as_list(load) -> list[str]:  # a list, or the string an earlier version of this script wrote
    return load if isinstance(load, list) else [x.strip(" '") for x in str(load).strip("[]").split(",")]


STEP_COLUMNS = ("dispatch", "start_to_call", "call_to_first_step", "train", "after_train", "reply", "server")


def markdown(results: list[tuple[str, dict]]) -> str:
    """The table of docs/deployment-timing.md from this script's JSON lines (``--table LABEL=FILE ...``)."""
    rounds = max(r["rounds"] for _, r in results)
    head = ["run"] + [f"round {i}" for i in range(rounds + 1)] + ["median 2..N", "start → first step"] + \
        [c.replace("_", " ") for c in STEP_COLUMNS] + ["load before / after"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in results:
        rs = r["round_seconds"]
        first = r.get("start_to_first_step") or {}
        cells = [label] + [f"{rs[str(i)]:.1f}" if str(i) in rs else "" for i in range(rounds + 1)]
        cells += [f"**{r['median_s']:.1f} s**", f"{first.get('median', float('nan')):.1f} (max {first.get('max', float('nan')):.1f})"]
        cells += [f"{r['steps'][c]:.2f}" if c in r["steps"] else "" for c in STEP_COLUMNS]
        cells += [" / ".join(", ".join(_as_list(r[k])) for k in ("load_before", "load_after"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", nargs="+", metavar="LABEL=FILE",
                        help="print the markdown table of earlier results (one JSON line per file) and exit")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep", default="", help="work folder to keep (logs, timestamps); default: a temporary one")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment of the deployment's processes (e.g. Flower's polling settings)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds the run may take")
    parser.add_argument("--no-worker", action="store_true",
                        help="start the sites with `fedtl-site start --no-worker` (one ClientApp process per message)")
    parser.add_argument("--analyse", metavar="WORK_DIR",
                        help="print the figures of a run kept with --keep (no load figures) and exit")
    args = parser.parse_args(argv)
    if args.analyse:
        print(json.dumps(analyse(Path(args.analyse) / "run", Path(args.analyse) / "timing.jsonl", args.rounds)))
        return 0
    if args.table:
        print(markdown([(label, json.loads(Path(path).read_text().strip().splitlines()[-1]))
                        for label, path in (item.split("=", 1) for item in args.table)]))
        return 0

    def stop(signum, _frame):
        raise KeyboardInterrupt(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        result = run(args)
    except KeyboardInterrupt:
        print(json.dumps({"error": "interrupted; every process it started was stopped"}))
        return 130
    except Exception as exc:  # noqa: BLE001 - one JSON line, whatever failed
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
