"""``fedtl report RUN_DIR``: one self-contained HTML page about a run (plots embedded as SVG).

Everything on the page comes from the run directory (``config.json``, ``metrics.jsonl``,
``summary.json``, ``suffix.safetensors``'s metadata). Site names and reasons were written by the
sites, which the server does not trust: every string is HTML-escaped, and the page loads nothing
from the network (no scripts, no external styles or fonts).
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import re
import tempfile
from pathlib import Path

from fedtl.errors import ConfigError
from fedtl.evaluation import sites_auc

FIGURES = ("auc", "accuracy", "epsilon", "bytes")  # the plots every report holds, in order


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run} holds no metrics.jsonl: not a fedtl run directory (or the run never started).")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} line {number} is not JSON ({exc.msg}); the run directory is damaged.") from None
    return rows


def _num(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None \
        and math.isfinite(float(value)) else math.nan


def _fmt(value, digits: int = 4) -> str:
    v = _num(value)
    return "–" if math.isnan(v) else f"{v:.{digits}f}"


def _svg(fig) -> str:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: inline SVG in HTML
    return re.sub(r"<!--.*?-->", "", text, flags=re.S)  # matplotlib's comments repeat the (site-given) labels


def _plots(rows: list[dict], summary: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    selected = summary.get("selected_round")
    out = {}
    for name, key, ylabel in (("auc", "auc", "AUC"), ("accuracy", "acc", "accuracy")):
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for prefix, label, style in (("", "central", "-"), ("fed_", "sites pooled", "--")):
            for split in ("val", "test"):  # the sites' AUC: over all their images, as selected and headlined
                ys = [_num(sites_auc(r, split) if prefix and key == "auc" else r.get(f"{prefix}{split}_{key}"))
                      for r in rows]
                if any(not math.isnan(y) for y in ys):
                    ax.plot(rounds, ys, style, label=f"{label} {split}", linewidth=1.8)
        sites = sorted({s for r in rows for s in r.get("sites_eval", {})})
        for site in sites:
            ys = [_num(r.get("sites_eval", {}).get(site, {}).get(f"test_{key}")) for r in rows]
            ax.plot(rounds, ys, linewidth=0.7, alpha=0.5, label=f"{site} test" if len(sites) <= 6 else None)
        if selected is not None:
            ax.axvline(selected, color="grey", linestyle=":", label=f"selected round {selected}")
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        out[name] = _svg(fig)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    sites = sorted({s for r in rows for s in r.get("privacy", {})})
    for site in sites:
        xs, ys, budget = [], [], math.nan
        for r in rows:
            p = r.get("privacy", {}).get(site)
            if p:
                xs.append(r["round"])
                ys.append(_num(p.get("epsilon")))
                budget = _num(p.get("budget"))
        line, = ax.plot(xs, ys, marker=".", linewidth=1, label=site if len(sites) <= 12 else None)
        if not math.isnan(budget):
            ax.axhline(budget, color=line.get_color(), linestyle=":", linewidth=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative ε (dotted: budget)")
    ax.grid(alpha=0.3)
    if sites:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no DP spend reported", ha="center", transform=ax.transAxes)
    out["epsilon"] = _svg(fig)
    fig, ax = plt.subplots(figsize=(7, 3.0))
    trained = [r for r in rows if r["round"] > 0]
    ax.bar([r["round"] - 0.2 for r in trained], [r.get("bytes_down", 0) for r in trained], width=0.4, label="sent to sites")
    ax.bar([r["round"] + 0.2 for r in trained], [r.get("bytes_up", 0) for r in trained], width=0.4, label="received")
    ax.set_xlabel("round")
    ax.set_ylabel("bytes")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    out["bytes"] = _svg(fig)
    return out


def _table(header: list[str], body: list[list[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _events(rows: list[dict]) -> list[list[str]]:
    body = []
    for r in rows:
        for kind in ("declined", "rejected", "failed"):
            for site, reason in (r.get(kind) or {}).items():
                body.append([str(r["round"]), kind, site, str(reason)])
        for site in r.get("timed_out") or []:
            body.append([str(r["round"]), "timed out", site, ""])
        for site in r.get("not_connected") or []:
            body.append([str(r["round"]), "not connected", site, "took part in an earlier round; not connected when "
                                                                  "this one was sent"])
        for site, reason in (r.get("eval_skipped") or {}).items():
            body.append([str(r["round"]), "no evaluation", site, str(reason)])
    return body


_KINDS = {"finetune": "local fine-tuning", "local-head": "a local head trained in the rounds"}


def _personalization(p: dict | None) -> str:
    """Each site's test AUC under the global suffix and its personal one (kept at the site, chosen on validation)."""
    if not p:
        return ""
    body = [[s, str(r.get("kept", "")), _fmt(r.get("global_test_auc")), _fmt(r.get("personal_test_auc")),
             _fmt(_num(r.get("personal_test_auc")) - _num(r.get("global_test_auc"))), _fmt(r.get("global_test_acc")),
             _fmt(r.get("personal_test_acc")), _fmt(r.get("epsilon"), 3)] for s, r in (p.get("sites") or {}).items()]
    lines = [f"worst site's test AUC: {_fmt(p.get('worst_global_auc'))} (global) → {_fmt(p.get('worst_personal_auc'))} "
             f"(personal); largest loss at a site: {_fmt(p.get('max_loss'))}"]
    skipped = [[s, r] for s, r in (p.get("skipped") or {}).items()]
    return "".join([
        f"<h2>Personalization ({_KINDS.get(p.get('kind'), 'local fine-tuning')}; each personal suffix stays at its "
        "site)</h2>",
        f"<p>{html.escape(lines[0])}</p>",
        _table(["site", "kept", "global test AUC", "personal test AUC", "Δ AUC", "global test acc",
                "personal test acc", "ε after"], body) if body else "<p>No site replied.</p>",
        _table(["site that kept the global suffix", "reason"], skipped) if skipped else ""])


def render(run: str | Path) -> str:
    run = Path(run)
    rows = _rows(run)
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    plots = _plots(rows, summary)
    e = html.escape
    status = "completed" if summary else "incomplete (no summary.json: interrupted or running; resumable from its checkpoint)"
    decision = summary.get("decision") or {}
    if decision.get("rule") == "threshold":
        rule = f"threshold {decision.get('threshold')} on P(class 1), chosen on {decision.get('chosen-on', '')}"
    elif decision.get("rule") == "bias":
        rule = f"argmax of log P + offsets {decision.get('bias')}, chosen on {decision.get('chosen-on', '')}"
    else:
        rule = "argmax"
    headline = [
        ["status", status],
        ["test AUC", _fmt(summary.get("test_auc"))], ["test accuracy", _fmt(summary.get("test_acc"))],
        ["test accuracy at argmax", _fmt(summary.get("test_acc_argmax"))], ["decision rule", rule],
        ["selected round", f"{summary.get('selected_round', '–')} of {summary.get('rounds', len(rows) - 1)} "
                           f"(by {summary.get('selection_metric', '–')}, "
                           f"{(summary.get('evaluation') or {}).get('selected_by', '–')})"],
        ["evaluation data at the server", str((summary.get("evaluation") or {}).get("server_data", "–"))],
        ["headline figures from", str((summary.get("evaluation") or {}).get("headline", "–"))],
        ["head's features", f"{(summary.get('evaluation') or {}).get('pooling', config.get('model.pooling', '–'))} "
                            f"pooling, standardized by "
                            f"{(summary.get('evaluation') or {}).get('standardized_by') or '–'}"],
        ["max ε", f"{_fmt(summary.get('epsilon_max'), 3)} (δ = {summary.get('delta')})"],
        ["bytes per site per round", f"{summary.get('bytes_per_site_round', '–')} "
                                     f"({100 * _num(summary.get('bytes_per_site_round_fraction_of_model')):.3f} % of the model)"],
        ["backbone", f"{summary.get('backbone', config.get('model.backbone', '–'))}, cut after "
                     f"{summary.get('split_after', '–')}"],
        ["backbone weights sha256", str(summary.get("weights_sha256", "–"))],
        ["aggregation", str(summary.get("aggregation", config.get("federation.aggregation", "–")))],
        ["wall time", f"{summary.get('wall_seconds', '–')} s"
                      + (" (since the last resume)" if summary.get("resumed_after_rounds") else "")],
    ]
    if summary.get("resumed_after_rounds"):
        headline.insert(1, ["resumed", "after round " + ", ".join(str(r) for r in summary["resumed_after_rounds"])
                            + " (the server stopped; the run continued from its checkpoint)"])
    per_site = summary.get("per_site") or {}
    site_rows = [[s, str(f.get("test_n", "")), _fmt(f.get("test_auc")), _fmt(f.get("test_acc")),
                  _fmt(f.get("test_acc_argmax")), _fmt(f.get("val_auc")), str(f.get("val_n", ""))]
                 for s, f in (per_site.get("sites") or {}).items()]
    pooled = per_site.get("pooled") or {}
    if site_rows:
        over_all = math.isfinite(_num(pooled.get("test_auc_pooled")))  # a run from before: means only
        site_rows.append(["pooled (AUC over all the sites' images; accuracy example-weighted)" if over_all else
                          "pooled (example-weighted)",
                          str(pooled.get("test_n", "")), _fmt(sites_auc(pooled, "test", "")),
                          _fmt(pooled.get("test_acc")), _fmt(pooled.get("test_acc_argmax")),
                          _fmt(sites_auc(pooled, "val", "")), str(pooled.get("val_n", ""))])
        if over_all:
            site_rows.append(["mean of the sites' AUCs (example-weighted)", "", _fmt(pooled.get("test_auc")), "", "",
                              _fmt(pooled.get("val_auc")), ""])
    if "test_auc" in (rows[0] if rows else {}) and summary:
        best = rows[summary["selected_round"]] if summary.get("selected_round", -1) < len(rows) else {}
        site_rows.append(["central (server's test split)", "", _fmt(best.get("test_auc")), _fmt(best.get("test_acc")),
                          _fmt(best.get("test_acc_argmax")), _fmt(best.get("val_auc")), ""])
    skipped = [[s, r] for s, r in (per_site.get("skipped") or {}).items()]
    personal_part = _personalization(summary.get("personalization"))
    events = _events(rows)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">",
        f"<title>fedtl run {e(run.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>fedtl run <code>{e(str(run))}</code></h1>",
        "<h2>Summary</h2>", _table(["", ""], headline),
        "<h2>Per-site results (selected suffix)</h2>",
        _table(["site", "test n", "test AUC", "test accuracy (the run's rule)", "… at the argmax", "val AUC", "val n"],
               site_rows) if site_rows
        else "<p>No federated evaluation in this run.</p>",
        (_table(["site without figures", "reason"], skipped) if skipped else ""),
        personal_part,
        "<h2>AUC per round</h2>", f"<figure id='fig-auc'>{plots['auc']}</figure>",
        "<h2>Accuracy per round</h2>", f"<figure id='fig-accuracy'>{plots['accuracy']}</figure>",
        "<h2>Privacy spent per site</h2>", f"<figure id='fig-epsilon'>{plots['epsilon']}</figure>",
        "<h2>Bytes per round</h2>", f"<figure id='fig-bytes'>{plots['bytes']}</figure>",
        "<h2>Sites that declined, were rejected, failed or timed out</h2>",
        _table(["round", "what", "site", "reason"], events) if events else "<p>None.</p>",
        "<h2>Resolved configuration</h2>",
        "<p>The server's run configuration. Simulated sites train under its <code>privacy.*</code> keys; a deployed "
        "site trains under its own <code>site.toml</code>, whose <code>[privacy]</code> table the server cannot "
        "change (each site's budget and spend as it reported them: \"Privacy spent per site\").</p>",
        _table(["key", "value"], [[k, json.dumps(v)] for k, v in sorted(config.items())]),
        "</body></html>",
    ]
    return "\n".join(parts)


_CSS = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1rem}td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:left;
font-size:.9rem;vertical-align:top}th{background:#f3f3f3}figure{margin:0}svg{max-width:100%;height:auto}
code{background:#f3f3f3;padding:0 .2rem}"""


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Render the report and write it atomically (``RUN_DIR/report.html`` by default)."""
    run = Path(run)
    if not run.is_dir():
        raise ConfigError(f"Run directory {run} does not exist or is not a folder.")
    target = Path(out) if out else run / "report.html"
    if not target.parent.is_dir():
        raise ConfigError(f"--out {target}: the folder {target.parent} does not exist.")
    body = render(run)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".report-", suffix=".html")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(body)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for reading
    os.replace(tmp, target)
    return target
