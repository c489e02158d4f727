"""The cost of one train message at a deployed site, in a fresh process as Flower's SuperNode runs it.

    python simulations/benchmarks/clientapp_cost.py SITE_TOML ROUND   # then ROUND + 1: the steady state

Imports what ``flwr-clientapp`` imports, loads ``clients/app.py`` and calls the ClientApp with a hand-built
train message (run ``cpu-probe``, 40 planned rounds, EfficientNet-Lite0's pinned hash, a zero 2-class head on
112 features). Prints one JSON line: for ``app_loaded``, ``call``, ``first_step`` (the first training step)
and ``return``, ``[process CPU seconds, wall seconds since the process started]``; the libraries loaded; the
load average. CPU seconds hardly depend on what else the machine runs; wall seconds do. Each call trains (and
spends) a round in the site's ledger: use a copy of a site (e.g. one ``deploy_timing.py --keep`` left).
"""
import json, os, sys, time
with open("/proc/self/stat") as fh:
    ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
with open("/proc/stat") as fh:
    btime = next(int(l.split()[1]) for l in fh if l.startswith("btime"))
START = btime + ticks / os.sysconf("SC_CLK_TCK")
marks = {}
def mark(k):
    marks.setdefault(k, (round(time.process_time(), 2), round(time.time() - START, 2)))
import flwr.supernode.cli.flwr_clientapp  # noqa: F401  what the flwr-clientapp command imports first
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
import clients.app
mark("app_loaded")
import fedtl.training as tr
orig = tr._run_epochs
def wrapped(*a, **k):
    mark("first_step")
    return orig(*a, **k)
tr._run_epochs = wrapped
import numpy as np
site, rnd = sys.argv[1], int(sys.argv[2])
import torch
arrays = ArrayRecord({"suffix.head.0.weight": torch.zeros(2, 112), "suffix.head.0.bias": torch.zeros(2)})
meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id=str(rnd),
                created_at=0.0, ttl=600.0, message_type=MessageType.TRAIN)
cfg = {"num-classes": 2, "total-rounds": 40, "run-id": "cpu-probe", "server-round": rnd,
       "backbone-sha256": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"}
msg = Message(content=RecordDict({"config": ConfigRecord(cfg), "arrays": arrays}), metadata=meta)
context = Context(run_id=1, node_id=7, node_config={"site-config": site}, state=RecordDict(), run_config={})
mark("call")
reply = clients.app.app(msg, context)
mark("return")
print(json.dumps({"marks": marks, "declined": reply.content["metrics"]["declined"],
                  "imported": sorted(m for m in ("timm", "torchvision.models", "peft", "sklearn", "scipy", "opacus") if m in sys.modules),
                  "load": open("/proc/loadavg").read().split()[:3]}))
