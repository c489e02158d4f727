"""`fedtl report`: every figure embedded, every site string escaped, nothing loaded from the network."""

import json
import re

import pytest

from fedtl.cli import main
from fedtl.report import FIGURES, render

EVIL = '<script>alert("x")</script><img src=http://evil.example/x.png>'


def _run_dir(tmp_path, complete=True):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"round": 0, "val_auc": 0.5, "test_auc": 0.5, "val_acc": 0.6, "test_acc": 0.62, "seconds": 0.1}]
    for r in (1, 2, 3):
        rows.append({"round": r, "val_auc": 0.8 + r / 100, "test_auc": 0.79 + r / 100, "val_acc": 0.7, "test_acc": 0.71,
                     "fed_val_auc": 0.81, "fed_test_auc": 0.8, "fed_val_acc": 0.7, "fed_test_acc": 0.72,
                     "sites_eval": {"site-a": {"test_auc": 0.9, "test_acc": 0.8, "test_n": 10}, EVIL: {"test_auc": 0.1}},
                     "privacy": {"site-a": {"epsilon": 0.5 * r, "budget": 3.0}, EVIL: {"epsilon": 0.4 * r, "budget": 2.0}},
                     "bytes_up": 2396, "bytes_down": 2396, "declined": {EVIL: EVIL} if r == 2 else {},
                     "rejected": {"site-b": "values up to 1e+30"} if r == 3 else {}, "timed_out": ["site-c"] if r == 1 else [],
                     "not_connected": ["site-d"] if r == 3 else []})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.json").write_text(json.dumps({"model.backbone": "efficientnet_lite0", "federation.rounds": 3}))
    if complete:
        summary = {"test_auc": 0.8123, "test_acc": 0.7345, "test_acc_argmax": 0.7001, "selected_round": 2,
                   "selection_metric": "val_auc", "rounds": 3, "epsilon_max": 1.5, "delta": 1e-5,
                   "decision": {"rule": "threshold", "threshold": 0.62, "chosen-on": "central validation (524 images)"},
                   "evaluation": {"server_data": "x.npz", "selected_by": "central", "headline": "central test split",
                                  "pooling": "avg-std-grid",
                                  "standardized_by": f"the sites' evaluation images (median of 2 site(s): a, {EVIL})"},
                   "per_site": {"sites": {"site-a": {"test_n": 10, "test_auc": 0.9, "test_acc": 0.8},
                                          EVIL: {"test_n": 3, "test_auc": None}},
                                "pooled": {"test_n": 13, "test_auc": 0.85, "test_acc": 0.75}, "skipped": {"site-z": EVIL}},
                   "backbone": "efficientnet_lite0", "weights_sha256": "57934424" + "0" * 56, "split_after": "blocks.5",
                   "bytes_per_site_round": 1198, "bytes_per_site_round_fraction_of_model": 0.0004}
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_the_report_holds_every_figure_and_table(tmp_path):
    page = render(_run_dir(tmp_path))
    for name in FIGURES:
        assert re.search(rf"<figure id='fig-{name}'><svg[^>]*>.*?</svg>\s*</figure>", page, re.S), name
    for text in ("0.8123", "0.7345", "threshold 0.62", "central validation (524 images)", "selected round",
                 "57934424" + "0" * 56, "pooled (example-weighted)", "values up to 1e+30", "timed out", "site-c",
                 "federation.rounds", "efficientnet_lite0", "not connected</td><td>site-d", "whose <code>[privacy]</code> table the server cannot",
                 "avg-std-grid pooling, standardized by the sites&#x27; evaluation images (median of 2 site(s): a, "):
        assert text in page, text


def test_site_strings_are_escaped_and_nothing_is_fetched(tmp_path):
    page = render(_run_dir(tmp_path))
    assert "<script" not in page and "<img" not in page  # a hostile site's name or reason is only text
    assert "&lt;script&gt;" in page
    assert not re.search(r"""<[^>]*\b(src|href)\s*=\s*["']?(https?:)?//""", page)  # no tag loads a URL
    assert "<link" not in page and "@import" not in page and not re.search(r"url\((?!#)", page)  # only url(#local)
    assert "default-src 'none'" in page  # and the browser is told not to fetch anything


def test_an_interrupted_run_still_gets_a_report(tmp_path):
    page = render(_run_dir(tmp_path, complete=False))
    assert "incomplete" in page and page.count("<svg") == len(FIGURES)


def test_the_cli_writes_the_report_and_refuses_what_is_not_a_run(tmp_path, capsys):
    run = _run_dir(tmp_path)
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert (run / "report.html").stat().st_mode & 0o044  # readable by others, not private
    assert main(["report", str(tmp_path / "nope")]) == 2 and "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2 and "no metrics.jsonl" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text('{"round": 0}\n{broken\n')
    before = (run / "report.html").read_text()
    assert main(["report", str(run)]) == 2 and "line 2 is not JSON" in capsys.readouterr().err
    assert (run / "report.html").read_text() == before  # a failed render leaves the old report whole


@pytest.mark.parametrize("bad", ["--out=/nonexistent-folder/r.html"])
def test_an_unwritable_target_is_a_clear_error(tmp_path, capsys, bad):
    assert main(["report", str(_run_dir(tmp_path)), bad]) == 2 and "does not exist" in capsys.readouterr().err


def test_a_bias_rule_run_names_its_rule(tmp_path):
    run = _run_dir(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary["decision"] = {"rule": "bias", "bias": [0.0, 1.5], "chosen-on": "central validation (120 images)"}
    (run / "summary.json").write_text(json.dumps(summary))
    page = render(run)
    assert "argmax of log P + offsets [0.0, 1.5], chosen on central validation (120 images)" in page
    # the sites' prediction rows give their accuracies at the offsets, as histograms do at a threshold: no caveat,
    # and each site's accuracy at the argmax stands beside the one at the rule
    assert "are at the argmax" not in page and "test accuracy (the run&#x27;s rule)" in page and "… at the argmax" in page


def test_the_personalization_table_names_how_the_sites_personalized(tmp_path):
    run = _run_dir(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    row = {"kept": "tuned", "global_test_auc": 0.87, "personal_test_auc": 0.89, "epsilon": 2.9}
    for kind, words in (("local-head", "a local head trained in the rounds"), ("finetune", "local fine-tuning"),
                        (None, "local fine-tuning")):  # a run directory from before `kind` was recorded
        summary["personalization"] = {"kind": kind, "sites": {"site-3": row}, "skipped": {}, "worst_global_auc": 0.87,
                                      "worst_personal_auc": 0.89, "max_loss": 0.0}
        (run / "summary.json").write_text(json.dumps(summary))
        page = render(run)
        assert f"Personalization ({words}; each personal suffix stays at its site)" in page
        assert "0.8700" in page and "0.8900" in page


def test_the_sites_pooled_row_shows_the_auc_over_all_their_images_and_their_mean_beside_it(tmp_path):
    """Without server data the headline is one AUC over all the sites' test images (as a central test split gives);
    the mean of the sites' AUCs, another figure, is shown on its own row, named."""
    run = _run_dir(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary["per_site"]["pooled"].update({"test_auc_pooled": 0.8712, "val_auc_pooled": 0.8833, "val_auc": 0.9001})
    (run / "summary.json").write_text(json.dumps(summary))
    page = render(run)
    pooled_row = re.search(r"<tr><td>pooled \(AUC over all the sites&#x27; images; accuracy example-weighted\)</td>"
                           r"(.*?)</tr>", page)
    assert pooled_row and "0.8712" in pooled_row.group(1) and "0.8833" in pooled_row.group(1), page[-3000:]
    mean_row = re.search(r"<tr><td>mean of the sites&#x27; AUCs \(example-weighted\)</td>(.*?)</tr>", page)
    assert mean_row and "0.8500" in mean_row.group(1) and "0.9001" in mean_row.group(1)
    assert "pooled (example-weighted)" not in page


def test_a_resumed_run_says_so_in_the_report(tmp_path):
    run = _run_dir(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary.update(resumed_after_rounds=[4], wall_seconds=52.5)
    (run / "summary.json").write_text(json.dumps(summary))
    page = render(run)
    assert "<td>resumed</td><td>after round 4 (the server stopped; the run continued from its checkpoint)</td>" in page
    assert "52.5 s (since the last resume)" in page
