"""A site builds the head the server resolved (``model.head = auto``: ordinal for graded labels) from the request's
``head``; the site never decides it, and what the server names is untrusted input like the rest of its request."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, RecordDict

from tests.unit.federation.test_first_round import _ledger_rounds as _rounds
from tests.unit.federation.test_worker import _warm_site


def _train(site: Path, content: RecordDict, arrays=None, **config) -> tuple[dict, RecordDict]:
    from fedtl.federation.handlers import handle_train

    sent = RecordDict({"config": ConfigRecord({**dict(content["config"]), **config}),
                       "arrays": arrays if arrays is not None else content["arrays"]})
    reply = handle_train(sent, {}, {"site-config": str(site)}, 1, received_at=time.monotonic())
    return dict(reply["metrics"]), reply


@pytest.mark.slow
def test_the_site_trains_the_head_the_server_names_and_refuses_anything_else(tmp_path, monkeypatch):
    from fedtl.backbones import get_spec
    from fedtl.config import ModelConfig
    from fedtl.federation.records import to_record
    from fedtl.model import SuffixModel

    site, content = _warm_site(tmp_path, monkeypatch)  # the server's suffix: the linear head, pooling avg
    spec = get_spec("efficientnet_lite0")
    sha = content["config"]["backbone-sha256"]
    ordinal = SuffixModel(spec.name, sha, spec.recommended_cut, 16, 2, ModelConfig(pooling="avg", head="ordinal"))
    # a hostile or unresolved head: refused before anything is planned or spent
    for bad in ("auto", "../mlp", 7):
        metrics, reply = _train(site, content, head=bad)
        assert metrics["declined"] == 1 and "`head` must be one of" in str(reply["info"]["reason"]), bad
    # a head that does not match the server's tensors: the tensors are refused, nothing spent
    metrics, reply = _train(site, content, head="ordinal")
    assert metrics["declined"] == 1 and "do not match the model" in str(reply["info"]["reason"])
    assert _rounds(tmp_path) == []
    # the ordinal head the server resolved: trained and sent back as the server's tensors (one score, cut points)
    metrics, reply = _train(site, content, arrays=to_record(ordinal.trainable_state()), head="ordinal")
    assert metrics["declined"] == 0, reply["info"]["reason"]
    sent_back = next(iter(reply.array_records.values()))
    assert sorted(sent_back.keys()) == sorted(ordinal.trainable_state()) and any(k.endswith(".cuts") for k in sent_back)
    # a server that names no head (an older one): the linear head, as before
    later = RecordDict({"config": ConfigRecord({**dict(content["config"]), "server-round": 2}), "arrays": content["arrays"]})
    metrics, reply = _train(site, later)
    assert metrics["declined"] == 0 and not any(k.endswith(".cuts") for k in next(iter(reply.array_records.values())))
    assert _rounds(tmp_path) == [1, 2]
