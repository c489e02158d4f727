"""A site's local head (``personalization.kind = local-head``): trained every round, kept in its state dir, never sent.

FedRoD-style personalization (Chen & Chao, "On Bridging Generic and Personalized Federated Learning for Image
Classification", ICLR 2022): the shared part of the suffix (adapters or unfrozen units, when there are any) and the
global head train on the global head's loss as without personalization; beside them, in the same DP-SGD steps, the
site trains a head of its own on the same (detached) head inputs (:class:`fedtl.training.WithLocalHead`). One
per-example clip bounds both, so the local head is a function of the same private steps and needs no ε of its own; it
never leaves the site. After the last round the site weighs "global suffix with its local head" against the global
suffix on its validation split (``fedtl.federation.personal_site``).

The file is the site's own state: written atomically after the round's ledger entry, read back only when it belongs to
the same run (a new run starts from the global head it receives) and matches the head's names, shapes and dtypes;
anything else is logged and ignored (the site then starts from the global head: nothing is lost but the
personalization).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from fedtl.model import check_state, expected_of

log = logging.getLogger(__name__)

LOCAL_HEAD = "local-head.safetensors"
HEAD_PREFIX = "suffix.head."


def local_head_path(policy) -> Path:
    """Next to the site's ledger, in its state dir (simulated: ``<run>/sites/<site>/``)."""
    return policy.ledger_path.parent / LOCAL_HEAD


def read_local_head(model: nn.Module, policy, run_id: str) -> tuple[nn.Module | None, str]:
    """(this run's local head of this site, '') or (None, why not): a copy of ``model``'s head with the saved
    tensors, when the file is this run's and fits the head. The copy's ``dp`` attribute says whether it was trained
    in DP steps (its file's metadata: a site may change ``personalize-dp`` between rounds)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = local_head_path(policy)
    if not path.is_file():
        return None, "it holds no local head"
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged file is the site's to see in its log, never a crash
        log.warning("Site %s: its local head (%s) is unreadable (%s); it is not used.", policy.site, path, exc)
        return None, "its local head is unreadable"
    if meta.get("run") != str(run_id)[:128]:
        return None, "its local head belongs to another run"
    head = copy.deepcopy(model.suffix.head)
    problems = check_state(state, expected_of(head))
    if problems:
        log.warning("Site %s: its local head (%s) does not fit this run's head (%s); it is not used.", policy.site,
                    path, "; ".join(problems))
        return None, "its local head does not fit this run's head"
    head.load_state_dict(state)
    head.dp = meta.get("dp") == "true"
    return head, ""


def local_head_for_round(model: nn.Module, policy, run_id: str) -> nn.Module:
    """The head a site trains beside the global one this round: its own from the earlier rounds of this run, or (the
    first round, a new run, a damaged or foreign file) a copy of the global head it just received."""
    head, why = read_local_head(model, policy, run_id)
    if head is None:
        if why != "it holds no local head":
            log.info("Site %s starts its local head from the global head: %s.", policy.site, why)
        head = copy.deepcopy(model.suffix.head)
    for p in head.parameters():
        p.requires_grad_(True)
    return head


def save_local_head(head: nn.Module, policy, run_id: str, server_round: int, *, dp: bool) -> None:
    """Atomically, after the round's ledger entry is durable; a failure is logged (the round's update stands)."""
    from fedtl.federation.checkpoint import save_tensors_atomically

    path = local_head_path(policy)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors_atomically({k: v.detach().clone().contiguous() for k, v in head.state_dict().items()}, path,
                                metadata={"run": str(run_id)[:128], "round": str(int(server_round)),
                                          "site": policy.site, "dp": "true" if dp else "false"})
    except OSError as exc:
        log.error("Site %s could not save its local head to %s (%s); its next round starts from the global head.",
                  policy.site, path, exc)


class _HeadTwin(nn.Module):
    """A copy of the suffix whose head is the site's local head and whose shared part is frozen: what
    :func:`train_local_head` hands to :func:`fedtl.training.train_suffix` (the site's model is left untouched)."""

    def __init__(self, suffix: nn.Module, head: nn.Module):
        super().__init__()
        self.suffix = copy.deepcopy(suffix)
        self.suffix.head = head
        for p in self.suffix.blocks.parameters():
            p.requires_grad_(False)
        self.adapter_params: list[nn.Parameter] = []

    def trainable_param_groups(self, lr: float, lr_scale: float) -> list[dict]:
        return [{"params": [p for p in self.suffix.head.parameters() if p.requires_grad], "lr": lr}]

    def train(self, mode: bool = True) -> _HeadTwin:
        super().train(mode)
        for m in self.suffix.blocks.modules():  # frozen: BatchNorm keeps its statistics
            m.eval()
        return self


def train_local_head(cfg, model: nn.Module, head: nn.Module, data, *, batch_size: int, epochs: int,
                     generator: torch.Generator, standardize=None) -> None:
    """A site whose ``site.toml`` says ``personalize-dp = false`` trains its local head **without noise**, on its own
    after the round's DP step, over the shared part as that step left it: the update it sends is then exactly the one
    it would send without a local head (no share of the clipping norm), and the head, which never leaves the site, is
    private only while it stays there (joint DP; its file says ``dp: false``)."""
    from fedtl.training import train_suffix

    twin = _HeadTwin(model.suffix, head)
    train_suffix(twin, data.features, data.labels, cfg.train, batch_size=batch_size, epochs=epochs,
                 generator=generator, standardize=standardize)


def with_local_head(global_state: dict[str, torch.Tensor], head: nn.Module) -> dict[str, torch.Tensor]:
    """The global suffix with its head's tensors replaced by the site's local head (the personal candidate)."""
    local = {HEAD_PREFIX + k: v.detach().clone() for k, v in head.state_dict().items()}
    missing = [k for k in local if k not in global_state]
    if missing:
        raise ValueError(f"the local head's tensors {missing[:3]} are not in the suffix")
    return {k: local.get(k, v) for k, v in global_state.items()}
