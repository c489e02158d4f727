"""Seconds per DP-SGD step of each suffix kind: Opacus' closed-form per-sample gradients against fedtl's routing
of grouped convolutions through ``torch.func`` (``fedtl.privacy.engine.route_grouped_convs``), and the largest
relative difference between the two sets of per-sample gradients.

    python simulations/benchmarks/dp_step_time.py                       # 112 px, batch 64, 2 threads
    python simulations/benchmarks/dp_step_time.py --resolution 64 --full  # also the whole network (GroupNorm)

The suffix's input is the frozen prefix's output for random images (the timing does not depend on the values);
the head is given random weights so that every layer's gradient is non-zero. Each figure is the median of
``--steps`` steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
from torch import nn

from fedtl.config import FedTLConfig
from fedtl.federation.site import build_transfer_model
from fedtl.privacy.engine import route_grouped_convs


def per_sample_step(module: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[float, list]:
    """Median seconds of forward + backward with per-sample gradients; the last step's per-sample gradients."""
    from opacus import GradSampleModule

    gsm = GradSampleModule(module)
    times = []
    try:
        for _ in range(steps + 1):
            for p in module.parameters():
                p.grad, p.grad_sample = None, None
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
            times.append(time.perf_counter() - t)
        grads = [p.grad_sample.detach().clone() for p in module.parameters() if p.requires_grad]
    finally:
        gsm._close()
    return statistics.median(times[1:]), grads


def suffix_case(kind: str, resolution: int, batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    cfg = FedTLConfig.from_run_config({"adapters.kind": kind, "adapters.blocks": 1, "model.resolution": resolution})
    model = build_transfer_model(cfg.resolved(has_reference=True), 2)
    with torch.no_grad():
        x = model.prefix_pool(model.prefix(torch.randn(batch, 3, resolution, resolution)))
    model.train()
    torch.manual_seed(0)
    for p in model.suffix.parameters():
        if p.requires_grad and p.dim() == 2 and p.shape[0] == 2:  # the new head starts at zero: no upstream gradient
            nn.init.normal_(p, std=0.1)
    return model.suffix, x, torch.randint(0, 2, (batch,))


def full_case(resolution: int, batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from full_model import full_network

    net = full_network(FedTLConfig(), 2)
    torch.manual_seed(0)
    nn.init.normal_(net.head.weight, std=0.1)  # zero at the start: no upstream gradient
    return net.train(), torch.randn(batch, 3, resolution, resolution), torch.randint(0, 2, (batch,))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=112)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--full", action="store_true", help="also the whole network (BatchNorm → GroupNorm)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cases = [("head only", lambda: suffix_case("none", args.resolution, args.batch)),
             ("LoRA r4, block4_2", lambda: suffix_case("lora", args.resolution, args.batch)),
             ("unfreeze block4_2", lambda: suffix_case("unfreeze", args.resolution, args.batch))]
    if args.full:
        cases.append(("whole network (GroupNorm)", lambda: full_case(args.resolution, args.batch)))
    rows = []
    for name, build in cases:
        module, x, y = build()
        params = sum(p.numel() for p in module.parameters() if p.requires_grad)
        closed, g_closed = per_sample_step(module, x, y, args.steps)
        routed_layers = route_grouped_convs(module)
        routed, g_routed = per_sample_step(module, x, y, args.steps)
        diff = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)) for a, b in zip(g_closed, g_routed))
        rows.append({"suffix": name, "trainable_params": params, "grouped_convs_routed": routed_layers,
                     "seconds_closed_form": round(closed, 4), "seconds_routed": round(routed, 4),
                     "speed_up": round(closed / routed, 2), "max_relative_difference": diff})
        print(json.dumps(rows[-1]), flush=True)
    print(f"# resolution {args.resolution}, batch {args.batch}, {args.threads} threads, median of {args.steps} steps")


if __name__ == "__main__":
    main()
