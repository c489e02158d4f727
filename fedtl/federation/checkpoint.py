"""The server's per-round checkpoint: everything a resumed run needs, in one atomically replaced file.

``RUN_DIR/checkpoint.safetensors`` holds the global suffix after the last completed round
(``global.*``), the best-validation round's suffix (``best.*``) and, in its metadata, a JSON
document: the round, the fedtl run id (sent to sites, so a site recognizes a repeated round of
the same run), the tracker's best round and score, every metrics row so far, each site's last
reported privacy, and the resolved run config; under federated selection, the best round's released
validation scores per site (``eval.<i>.*``, the sites named in the metadata). It is written to a temporary file, fsync'd,
renamed over the previous one and the directory fsync'd: a crash at any instant leaves either
the previous checkpoint or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from fedtl.errors import ConfigError

CHECKPOINT = "checkpoint.safetensors"
FORMAT = 1


@dataclass
class Checkpoint:
    round: int
    run_id: str
    config: dict
    global_state: dict[str, torch.Tensor]
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    best_round: int = -1
    best_score: float = float("-inf")
    selection_metric: str = "val_auc"
    history: list[dict] = field(default_factory=list)  # metrics.jsonl rows, rounds 0..round
    privacy: dict[str, dict] = field(default_factory=dict)  # each site's last report
    # the best round's released validation scores per site (SiteEvaluation.val_releases; federated selection), so a
    # resumed run still compares a round scored at other sites on the sites both were scored at (None: a checkpoint
    # from before they were kept)
    best_eval: dict[str, dict[str, np.ndarray]] | None = None
    started: float = field(default_factory=time.time)
    resumed_after: list[int] = field(default_factory=list)  # the rounds after which the run stopped and was resumed

    def save(self, run_dir: Path) -> int:
        """Atomically replace ``run_dir/checkpoint.safetensors``; returns its size in bytes."""
        tensors = {f"global.{k}": v.detach().contiguous() for k, v in self.global_state.items()}
        tensors.update({f"best.{k}": v.detach().contiguous() for k, v in self.best_state.items()})
        sites = sorted(self.best_eval or {})
        tensors.update({f"eval.{i}.{k}": torch.as_tensor(v).contiguous() for i, s in enumerate(sites)
                        for k, v in self.best_eval[s].items()})
        meta = {"format": FORMAT, "round": self.round, "run_id": self.run_id, "config": self.config,
                "best_eval_sites": sites if self.best_eval is not None else None,
                "best_round": self.best_round, "best_score": _finite_or_none(self.best_score),
                "selection_metric": self.selection_metric, "history": self.history, "privacy": self.privacy,
                "started": self.started, "resumed_after": self.resumed_after, "saved": time.time()}
        target = Path(run_dir) / CHECKPOINT
        save_tensors_atomically(tensors, target, metadata={"fedtl": json.dumps(meta)})
        return target.stat().st_size

    @classmethod
    def load(cls, run_dir: Path) -> Checkpoint:
        path = Path(run_dir) / CHECKPOINT
        if not path.is_file():
            raise ConfigError(f"{run_dir} holds no checkpoint ({CHECKPOINT}); there is nothing to resume.")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {})["fedtl"])
            tensors = load_file(str(path))
        except (OSError, KeyError, ValueError, SafetensorError) as exc:
            raise ConfigError(f"Checkpoint {path} is unreadable ({exc}); it is left untouched.") from exc
        if meta.get("format") != FORMAT:
            raise ConfigError(f"Checkpoint {path} has format {meta.get('format')!r}; this fedtl reads {FORMAT}.")
        glob = {k.removeprefix("global."): v for k, v in tensors.items() if k.startswith("global.")}
        best = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")}
        sites = meta.get("best_eval_sites")  # absent in a checkpoint from before they were kept
        best_eval = None if sites is None else {
            s: {k.split(".", 2)[2]: v.numpy() for k, v in tensors.items() if k.startswith(f"eval.{i}.")}
            for i, s in enumerate(sites)}
        score = meta.get("best_score")
        return cls(round=int(meta["round"]), run_id=str(meta["run_id"]), config=dict(meta["config"]),
                   global_state=glob, best_state=best, best_round=int(meta["best_round"]),
                   best_score=float("-inf") if score is None else float(score),
                   selection_metric=str(meta.get("selection_metric", "val_auc")), history=list(meta["history"]),
                   privacy=dict(meta.get("privacy") or {}), best_eval=best_eval,
                   started=float(meta.get("started", time.time())),
                   resumed_after=[int(r) for r in meta.get("resumed_after") or []])


def save_tensors_atomically(tensors: dict[str, torch.Tensor], target: Path, metadata: dict | None = None) -> None:
    """Write a safetensors file so that a crash leaves the old file or the new one: a temporary file in
    the same folder, fsync'd, renamed over ``target``, then the folder fsync'd."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _finite_or_none(x: float):
    return x if x == x and abs(x) != float("inf") else None
