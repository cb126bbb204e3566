"""seqexp-report on hand-made runs: grouping, mean ± std over seeds, the paper's numbers and the
difference, the four files, and where they are logged."""

from __future__ import annotations

import csv
import errno
import io
import statistics
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import seqexp.apps.report as report_app
from seqexp.analysis.render import to_csv, to_latex, to_markdown
from seqexp.analysis.table import RunRecord, build_table, load_paper
from seqexp.apps.report import main
from seqexp.run.tracking import Tracker

PAPER = load_paper()


def record(model: str, dataset: str, mrr: float, recall: float, seed: int = 1,
           **params: str) -> RunRecord:
    base = {"model.name": model, "dataset.name": dataset, "seed": str(seed), "train.lr": "0.001",
            "device": "cpu", "paths.data_dir": f"/tmp/{seed}", "data.n_users": "40"}
    return RunRecord(f"{model}-{dataset}-{seed}", model, dataset, base | params,
                     {"test_mrr_at_20": mrr, "test_recall_at_20": recall})


def test_the_shipped_paper_table_is_the_spec_copy():
    spec = Path(__file__).resolve().parents[2] / "shared" / "spec" / "table2_paper.csv"
    if spec.is_file():
        assert load_paper(spec) == PAPER
    assert PAPER[("gru", "ml10m", "mrr_at_20")] == 0.04730
    assert PAPER[("attentional_ugru", "lastfm", "recall_at_20")] == 0.25485
    assert len(PAPER) == 8 * 2 * 2


def test_seeds_of_one_configuration_give_mean_and_sample_std_beside_the_paper():
    runs = [record("gru", "ml10m", mrr, recall, seed=seed)
            for seed, mrr, recall in ((1, 0.04, 0.15), (2, 0.05, 0.16), (3, 0.06, 0.17))]
    runs.append(record("itemknn", "lastfm", 0.05, 0.1, seed=7, device="cuda"))
    table = build_table(runs, PAPER)
    assert [row.label for row in table.rows] == ["itemknn", "gru"]  # the paper's order
    assert table.datasets == ["ml10m", "lastfm"]
    gru = table.rows[1].cells
    mrr = gru[("ml10m", "mrr_at_20")]
    assert mrr.n == 3 and mrr.mean == pytest.approx(0.05) and mrr.std == pytest.approx(0.01)
    assert mrr.paper == 0.04730 and mrr.diff == pytest.approx(0.05 - 0.04730)
    recall = gru[("ml10m", "recall_at_20")]
    assert recall.std == pytest.approx(0.01) and recall.diff == pytest.approx(0.16 - 0.15773)
    # gru has no lastfm run: the paper's number still stands beside an empty cell
    empty = gru[("lastfm", "mrr_at_20")]
    assert empty.n == 0 and empty.mean is None and empty.paper == 0.14374 and empty.diff is None
    single = table.rows[0].cells[("lastfm", "mrr_at_20")]
    assert single.n == 1 and single.std is None and single.diff == pytest.approx(0.05 - 0.04438)

    md = to_markdown(table)
    assert "| gru | 0.05000 ± 0.01000 (n=3) | 0.04730 | +0.00270 | 0.16000 ± 0.01000 (n=3) " \
           "| 0.15773 | +0.00227 | not run | 0.14374 |  |" in md
    assert md.splitlines()[0] == ("Data: ML-10M: the paper's data (the published archive's "
                                  "file); LastFM-1K: the paper's data (the published archive's "
                                  "file).")
    assert md.splitlines()[2].startswith("| model | ML-10M MRR@20 | paper | Δ | ML-10M Recall@20")
    tex = to_latex(table)
    assert r"gru & 0.05000 $\pm$ 0.01000 (n=3) & 0.04730 & $+0.00270$" in tex
    assert r"\multicolumn{6}{c}{ML-10M} & \multicolumn{6}{c}{LastFM-1K}" in tex
    assert tex.count(r"\\") == 3 + len(table.rows)  # three header lines
    assert r"gru & 0.05000" in tex and "not run" in tex
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert float(rows[1]["ml10m_mrr_at_20_mean"]) == pytest.approx(0.05)
    assert float(rows[1]["ml10m_mrr_at_20_std"]) == pytest.approx(0.01)
    assert rows[1]["ml10m_mrr_at_20_n"] == "3" and rows[1]["lastfm_mrr_at_20_mean"] == ""
    assert float(rows[0]["lastfm_mrr_at_20_diff"]) == pytest.approx(0.05 - 0.04438)


def test_a_model_run_in_several_configurations_gets_a_row_for_each():
    runs = [record("mf", "ml10m", 0.010, 0.07, seed=1, **{"train.lr": "0.01"}),
            record("mf", "ml10m", 0.012, 0.08, seed=2, **{"train.lr": "0.01"}),
            record("mf", "ml10m", 0.020, 0.09, seed=1, **{"train.lr": "0.001"}),
            # settings that differ only between datasets do not split the row
            record("mf", "lastfm", 0.030, 0.12, seed=1,
                   **{"train.lr": "0.01", "dataset.min_item_support": "5"}),
            record("expdecay_knn", "synthetic", 0.2, 0.4)]
    table = build_table(runs, PAPER)
    assert [row.label for row in table.rows] == [
        "expdecay_knn", "mf (train.lr=0.001)", "mf (train.lr=0.01)"]
    assert table.datasets == ["ml10m", "lastfm", "synthetic"]
    tuned = table.rows[2].cells
    assert tuned[("ml10m", "mrr_at_20")].mean == pytest.approx(0.011)
    assert tuned[("ml10m", "mrr_at_20")].std == pytest.approx(statistics.stdev([0.010, 0.012]))
    assert tuned[("lastfm", "mrr_at_20")].values == [0.030]
    assert table.rows[1].cells[("ml10m", "mrr_at_20")].values == [0.020]
    assert table.rows[0].cells[("synthetic", "mrr_at_20")].paper is None
    assert r"expdecay\_knn" in to_latex(table) and r"mf (train.lr=0.01)" in to_latex(table)


def _tracked(tracker: Tracker, model: str, dataset: str, seed: int, mrr: float, recall: float,
             tags: dict[str, str] | None = None, status: str = "FINISHED") -> str:
    run_id = tracker.start(f"{model}-{dataset}-{seed}", {
        "model": model, "dataset": dataset, "seed": str(seed), **(tags or {})})
    tracker.log_params({"model.name": model, "seed": str(seed), "train.lr": "0.001"})
    if status == "FINISHED":
        tracker.log_metrics({"test_mrr_at_20": mrr, "test_recall_at_20": recall},
                            headline_cutoff=20)
    tracker.end(status)
    return run_id


def test_report_from_an_experiment_writes_four_files_and_logs_them_to_the_parent(
        tmp_path, store_uri, capsys):
    uri = store_uri
    tracker = Tracker(uri, "table2")
    parent = tracker.start("table2-x", {"sweep_id": "x", "seqexp.role": "sweep"})
    tracker.end("FINISHED")
    child = {"mlflow.parentRunId": parent, "sweep_id": "x"}
    _tracked(tracker, "gru", "lastfm", 1, 0.10, 0.20, child)
    _tracked(tracker, "gru", "lastfm", 2, 0.14, 0.22, child)
    _tracked(tracker, "gru", "lastfm", 3, 0.0, 0.0, child, status="FAILED")

    main(["--tracking-uri", uri, "--experiment", "table2", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "2 runs in 1 rows; 1 unfinished runs left out" in printed
    files = {p.name: p for p in (tmp_path / "out").iterdir()}
    # named after the experiment
    assert set(files) == {"table2.md", "table2.csv", "table2.tex", "table2.png"}
    assert files["table2.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    row = next(csv.DictReader(files["table2.csv"].open()))
    assert float(row["lastfm_mrr_at_20_mean"]) == pytest.approx(0.12)
    assert float(row["lastfm_mrr_at_20_std"]) == pytest.approx(statistics.stdev([0.10, 0.14]))
    assert float(row["lastfm_mrr_at_20_paper"]) == 0.14374
    assert float(row["lastfm_recall_at_20_diff"]) == pytest.approx(0.21 - 0.20269)
    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert logged == {f"report/{name}" for name in files}
    # the same sweep, selected by its id, gives the same table
    main(["--tracking-uri", uri, "--sweep-id", "x", "--out", str(tmp_path / "again")])
    assert (tmp_path / "again" / "sweep-x.md").read_text() == files["table2.md"].read_text()


def test_runs_without_one_parent_get_a_report_run_of_their_own(tmp_path, store_uri):
    uri = store_uri
    tracker = Tracker(uri, "single")
    _tracked(tracker, "itemknn", "ml10m", 1, 0.03, 0.12)
    main(["--tracking-uri", uri, "--experiment", "single", "--out", str(tmp_path / "out")])
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("single").experiment_id
    reports = client.search_runs([experiment], "tags.`seqexp.role` = 'report'")
    assert len(reports) == 1 and reports[0].info.status == "FINISHED"
    assert len(client.list_artifacts(reports[0].info.run_id, "report")) == 4


def _report_runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([found], "tags.`seqexp.role` = 'report'")


def test_no_log_writes_the_files_and_logs_nothing(tmp_path, store_uri, capsys):
    tracker = Tracker(store_uri, "single")
    _tracked(tracker, "itemknn", "ml10m", 1, 0.03, 0.12)
    main(["--tracking-uri", store_uri, "--experiment", "single", "--out", str(tmp_path / "out"),
          "--no-log"])
    assert capsys.readouterr().out.rstrip().endswith("logged nothing (--no-log)")
    assert (tmp_path / "out" / "single.csv").is_file()
    assert _report_runs(store_uri, "single") == []


def _refused(*args, **kwargs):
    raise MlflowException("API request to endpoint /api/2.0/mlflow-artifacts/artifacts failed "
                          "with error code 403 != 200. Response body: 'Permission denied'")


@pytest.mark.parametrize("refused", ["create_run", "log_artifact"])
def test_a_reader_the_store_refuses_gets_the_files_exit_0_and_no_report_run(
        tmp_path, store_uri, capsys, monkeypatch, refused):
    # the team server's answer to a READ-only user (tests/test_tracking_server.py asks a real one)
    tracker = Tracker(store_uri, "single")
    _tracked(tracker, "itemknn", "ml10m", 1, 0.03, 0.12)
    monkeypatch.setattr(MlflowClient, refused, _refused)
    main(["--tracking-uri", store_uri, "--experiment", "single", "--out", str(tmp_path / "out")])
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert "; logged nothing: " in last and "(HTTP 403)" in last
    assert (tmp_path / "out" / "single.png").is_file()
    monkeypatch.undo()
    assert _report_runs(store_uri, "single") == []  # a report run it started is deleted again


@pytest.mark.parametrize("args, expected", [
    (["--experiment", "nope"], "no MLflow experiment named 'nope'"),
    (["--sweep-id", "nope"], "no finished seqexp runs with test metrics in sweep nope"),
])
def test_nothing_to_report_is_one_line(tmp_path, store_uri, capsys, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["--tracking-uri", store_uri, *args, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("seqexp-report: error: ") and expected in err[0]


# ---- per-event ranks: significance, marks, repeats, history ---------------------------------

def ranked(model: str, ranks, seed: int = 1, dataset: str = "ml10m", users=None,
           history=None, events: str = "e", **params: str) -> RunRecord:
    """A run with per-event ranks; test metrics computed from them."""
    import numpy as np

    from seqexp.analysis.table import event_values

    ranks = np.asarray(ranks)
    run = record(model, dataset, float(event_values(ranks, "mrr_at_20").mean()),
                 float(event_values(ranks, "recall_at_20").mean()), seed=seed, **params)
    run.run_id = f"{run.run_id}-{len(ranks)}-{ranks.sum()}"
    run.ranks, run.events = ranks, events
    run.users = np.arange(len(ranks)) if users is None else np.asarray(users)
    run.history = np.ones(len(ranks), int) if history is None else np.asarray(history)
    return run


def _no_defaults(model, dataset):
    return None


def test_significance_marks_holm_and_seed_averaging():
    import numpy as np

    rng = np.random.default_rng(0)
    base = rng.integers(1, 40, 400)
    runs = [ranked("gru", base, seed=1), ranked("gru", base, seed=2),
            # linear_ugru ranks every event first or second: better than gru beyond doubt
            ranked("linear_ugru", np.ones(400, int), seed=1),
            ranked("linear_ugru", np.full(400, 2), seed=2),
            # attentional_ugru: gru's ranks, two events moved: no evidence
            ranked("attentional_ugru", np.r_[base[:398], 1, 1]),
            # itemknn ranked other events: not comparable
            ranked("itemknn", base, events="other")]
    table = build_table(runs, PAPER, defaults=_no_defaults, resamples=2000)
    cells = {row.model: row.cells[("ml10m", "mrr_at_20")] for row in table.rows}
    better, same = cells["linear_ugru"].comparison, cells["attentional_ugru"].comparison
    assert cells["gru"].comparison is None and cells["itemknn"].comparison is None
    rr = np.where(base <= 20, 1.0 / base, 0.0)
    assert better.diff == pytest.approx((0.75 - rr).mean())  # seed-averaged: (1 + 1/2) / 2
    assert better.ci_low < better.diff < better.ci_high and better.seeds == (2, 2)
    assert better.p == pytest.approx(1 / 2001) and better.significant
    # two events differ, both in gru's disfavour: exact test, p = 2 / 2^2
    assert same.p == 0.5
    # Holm over the two compared models: the smaller p doubled, the larger kept
    assert better.p_holm == pytest.approx(2 * better.p)
    assert same.p_holm == 0.5 and not same.significant
    md = to_markdown(table)
    assert "| linear_ugru | 0.75000 ± 0.35355 (n=2) † |" in md
    assert "seed-averaged per-event values" in md
    rows = {r["model"]: r for r in csv.DictReader(io.StringIO(to_csv(table)))}
    assert rows["linear_ugru"]["ml10m_mrr_at_20_vs"] == "gru"
    assert rows["linear_ugru"]["ml10m_mrr_at_20_significant"] == "true"
    assert float(rows["attentional_ugru"]["ml10m_mrr_at_20_p"]) > 0.05
    assert rows["linear_ugru"]["ml10m_mrr_at_20_seeds_averaged"] == "2/2"
    assert rows["itemknn"]["ml10m_mrr_at_20_p"] == ""
    assert r"0.75000 $\pm$ 0.35355 (n=2)$^{\dagger}$" in to_latex(table)


def test_a_repeated_configuration_and_seed_counts_once():
    runs = [record("gru", "ml10m", 0.05, 0.15, seed=1), record("gru", "ml10m", 0.05, 0.15, seed=1),
            record("gru", "ml10m", 0.07, 0.17, seed=2)]
    table = build_table(runs, PAPER, defaults=_no_defaults)
    cell = table.rows[0].cells[("ml10m", "mrr_at_20")]
    assert cell.n == 2 and cell.values == [0.05, 0.07]
    assert "1 repeated runs (same configuration and seed) counted once." in to_markdown(table)


def test_settings_other_than_the_models_defaults_are_marked_and_named():
    runs = [record("gru", "ml10m", 0.05, 0.15, **{"train.epochs": "1", "model.hidden_size": "32"}),
            record("itemknn", "ml10m", 0.03, 0.1, **{"model.neighbours": "100"})]
    runs[0].params["model.extra"] = "7"  # a key the defaults lack is a setting of its own
    defaults = {"gru": {"model.name": "gru", "train.epochs": "10", "model.hidden_size": "1000",
                        "train.lr": "0.001"},
                "itemknn": {"model.name": "itemknn", "model.neighbours": "100",
                            "train.lr": "0.001"}}
    table = build_table(runs, PAPER, defaults=lambda model, dataset: defaults[model])
    md = to_markdown(table)
    assert "| gru | 0.05000 [a] |" in md and "| itemknn | 0.03000 |" in md
    assert "[a] settings other than the model's defaults: model.extra=7, " \
           "model.hidden_size=32, train.epochs=1" in md
    assert "0.05000$^{a}$" in to_latex(table)


def test_the_real_gru_defaults_come_from_table_1():
    from seqexp.analysis.table import model_defaults, non_default_settings

    defaults = model_defaults("gru")
    assert defaults["model.hidden_size"] == "1000" and defaults["train.epochs"] == "10"
    params = dict(defaults) | {"train.epochs": "1", "seed": "3", "device": "cpu"}
    assert non_default_settings(params, defaults) == {"train.epochs": "1"}


def test_a_dataset_presets_own_values_are_defaults_of_the_report():
    from seqexp.analysis.table import model_defaults, non_default_settings

    # the MovieLens presets set DREAM's basket gap to 0; elsewhere it is the default 1800 s
    ml100k = model_defaults("dream", "ml100k")
    assert ml100k["model.basket_gap_s"] == "0"
    assert model_defaults("dream", "a-csv-files-own-name")["model.basket_gap_s"] == "1800"
    assert "model.basket_gap_s" in non_default_settings(ml100k, model_defaults("dream"))
    run = record("dream", "ml100k", 0.02, 0.1, **{k: v for k, v in ml100k.items()
                                                  if k != "seed"})
    table = build_table([run], PAPER, defaults=model_defaults)
    assert table.rows[0].cells["ml100k", "mrr_at_20"].settings == {}


def test_a_dataset_the_paper_does_not_use_is_named_not_circularly():
    table = build_table([record("gru", "ml1m", 0.05, 0.15)], PAPER, defaults=_no_defaults)
    assert table.data["ml1m"] == ("ml1m: not the paper's data (the paper reports ML-10M and "
                                  "LastFM-1K only)")


def test_data_that_is_not_the_papers_is_marked_and_named_in_the_header():
    official = record("gru", "ml10m", 0.05, 0.15, **{"data.sha256": "aaa"})
    same_file = record("itemknn", "ml10m", 0.03, 0.1,
                       **{"dataset.path": "/x/ratings.dat", "data.sha256": "aaa"})
    other_file = record("mf", "ml10m", 0.02, 0.1,
                        **{"dataset.path": "/y/ml1m.dat", "data.sha256": "bbb"})
    synthetic = record("gru", "synthetic", 0.1, 0.3, **{"dataset.format": "synthetic"})
    table = build_table([official, same_file, other_file, synthetic], PAPER,
                        defaults=_no_defaults)
    md = to_markdown(table)
    assert md.splitlines()[0] == (
        "Data: ML-10M: partly not the paper's data (dataset.path=/y/ml1m.dat, a file that is "
        "not the published ML-10M file); synthetic: not the paper's data (generated data).")
    assert "| mf | 0.02000 ‡ |" in md and "| itemknn | 0.03000 |" in md
    assert "| 0.10000 ‡ |" in md and "‡ not the paper's data (see Data above)." in md


def test_history_quartile_curves_from_per_event_ranks():
    from seqexp.analysis.plots import history_curves

    # four users with 1, 2, 3, 4 training events; user u's events all rank u + 1
    users = [0, 0, 1, 2, 3, 3]
    ranks = [1, 1, 2, 3, 4, 30]
    history = [1, 1, 2, 3, 4, 4]
    run = ranked("gru", ranks, users=users, history=history)
    table = build_table([run], PAPER, defaults=_no_defaults)
    (label, values), edges = history_curves(table, "ml10m")[0][0], history_curves(
        table, "ml10m")[1]
    assert label == "gru" and edges.tolist() == [1, 1.75, 2.5, 3.25, 4]
    assert values.tolist() == pytest.approx([1.0, 0.5, 1 / 3, 1 / 8])


def test_report_with_logged_ranks_tests_and_plots_by_history(tmp_path, store_uri, capsys):
    import numpy as np

    from helpers import sequences
    from seqexp.engine.metrics import RankCounts
    from seqexp.run.artifacts import write_ranks

    data = sequences([[0, 1, 2, 3]] * 30, n_items=50, n_test=[2] * 30)
    tracker = Tracker(store_uri, "ranks")
    rng = np.random.default_rng(0)
    for model, seed, good in (("gru", 1, False), ("gru", 2, False), ("linear_ugru", 1, True)):
        greater = np.zeros(60, int) if good else rng.integers(0, 40, 60)
        counts = RankCounts(greater, np.zeros(60, int), np.repeat(np.arange(30), 2),
                            np.tile([2, 3], 30), np.tile([2, 3], 30))
        ranks = counts.rank_pessimistic()
        run_id = _tracked(tracker, model, "synthetic", seed,
                          float(np.where(ranks <= 20, 1 / ranks, 0).mean()),
                          float((ranks <= 20).mean()))
        tracker.run_id = run_id
        tracker.log_artifact(write_ranks(counts, data, tmp_path / f"{run_id}/test_ranks.parquet"))
    main(["--tracking-uri", store_uri, "--experiment", "ranks", "--out", str(tmp_path / "out"),
          "--resamples", "500"])
    printed = capsys.readouterr().out
    assert "| linear_ugru | 1.00000 † ‡ |" in printed
    assert "† differs from the row gru (unmarked itself) on the same test events" in printed
    assert (tmp_path / "out" / "ranks_mrr_by_history.png").read_bytes()[:4] == b"\x89PNG"


def _out_is_a_file(out: Path, monkeypatch) -> None:
    out.write_text("not a folder")


def _out_is_read_only(out: Path, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(report_app.tempfile, "mkdtemp", refuse)


def _disk_fills_mid_report(out: Path, monkeypatch) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(report_app, "plot", full)  # after three of the files were written


@pytest.mark.parametrize(("damage", "expected"), [
    (_out_is_a_file, "is a file; name a folder"),
    (_out_is_read_only, "cannot write the report there (Read-only file system)"),
    (_disk_fills_mid_report, "cannot write the report there (No space left on device)"),
])
def test_an_out_folder_that_cannot_take_the_report_is_one_line_and_nothing_half_written(
        tmp_path, store_uri, capsys, monkeypatch, damage, expected):
    _tracked(Tracker(store_uri, "table2"), "itemknn", "ml10m", 1, 0.03, 0.12)
    out = tmp_path / "out"
    damage(out, monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(["--tracking-uri", store_uri, "--experiment", "table2", "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("seqexp-report: error: ") and expected in err[0]
    assert out.is_file() or not out.exists() or list(out.iterdir()) == []


def test_the_dagger_tests_users_not_events():
    """linear_ugru beats gru on every one of user 0's 100 events and loses on the one event of
    each of four other users: 100 of 104 events say "better", one user of five does. Permuting
    users (p = 1 by hand: see test_significance) finds no difference; the event level would."""
    import numpy as np

    users = np.array([0] * 100 + [1, 2, 3, 4])
    gru = np.array([2] * 100 + [1] * 4)
    ugru = np.array([1] * 100 + [2] * 4)
    runs = [ranked("gru", gru, users=users), ranked("linear_ugru", ugru, users=users)]
    table = build_table(runs, PAPER, defaults=_no_defaults, resamples=2000)
    comparison = table.rows[[r.model for r in table.rows].index("linear_ugru")].cells[
        ("ml10m", "mrr_at_20")].comparison
    assert comparison.level == "users" and comparison.p == 1.0 and not comparison.significant
    assert "permutes users" in to_markdown(table)
    for run in runs:  # runs that did not log each event's user: tested event by event
        run.users = None
    table = build_table(runs, PAPER, defaults=_no_defaults, resamples=2000)
    comparison = table.rows[[r.model for r in table.rows].index("linear_ugru")].cells[
        ("ml10m", "mrr_at_20")].comparison
    assert comparison.level == "events" and comparison.significant
    assert "tested event by event" in to_markdown(table)


@pytest.mark.parametrize(("dataset", "expected"), [
    ("synthetic", ["seqexp (± std over seeds)"]),  # no paper value: no paper series
    ("lastfm", ["seqexp (± std over seeds)", "paper"]),
])
def test_the_charts_legend_lists_only_drawn_series_and_says_what_the_error_bars_are(
        tmp_path, dataset, expected):
    from seqexp.analysis.plots import plot

    runs = [record("gru", dataset, 0.10 + s / 100, 0.2, seed=s) for s in (1, 2)]
    runs += [record("linear_ugru", dataset, 0.12, 0.25, seed=s) for s in (1, 2)]
    table = build_table(runs, PAPER, defaults=_no_defaults)
    assert plot(table, tmp_path / "chart.png") == expected
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"


def test_an_older_stores_metric_names_are_read_like_the_current_ones(tmp_path, store_uri, capsys):
    tracker = Tracker(store_uri, "mixed")
    current = _tracked(tracker, "gru", "lastfm", 1, 0.10, 0.20)
    client = MlflowClient(store_uri)
    assert {"epoch/test/mrr_at_20", "epoch/test/recall_at_20"} == set(
        client.get_run(current).data.metrics)
    for seed, names, mrr, recall in ((2, ("test_mrr_at_20", "test_recall_at_20"), 0.14, 0.22),
                                     (3, ("test/mrr_at_20", "test/recall_at_20"), 0.12, 0.23)):
        old = tracker.start(f"gru-lastfm-{seed}", {"model": "gru", "dataset": "lastfm",
                                                   "seed": str(seed)})
        tracker.log_params({"model.name": "gru", "seed": str(seed), "train.lr": "0.001"})
        for name, value in zip(names, (mrr, recall), strict=True):  # as seqexp logged before
            client.log_metric(old, name, value)
        tracker.end("FINISHED")
    main(["--tracking-uri", store_uri, "--experiment", "mixed", "--out", str(tmp_path / "out")])
    row = next(csv.DictReader((tmp_path / "out" / "mixed.csv").open()))
    assert (row["lastfm_mrr_at_20_n"], float(row["lastfm_mrr_at_20_mean"])) == ("3",
                                                                                pytest.approx(0.12))
    assert float(row["lastfm_recall_at_20_mean"]) == pytest.approx(0.65 / 3)


def test_the_dagger_names_the_baseline_row_when_the_baseline_model_has_several_rows():
    ranks = list(range(1, 41))
    runs = [ranked("gru", ranks), ranked("gru", [1] * 40, **{"train.lr": "0.003"}),
            ranked("linear_ugru", [1] * 40)]
    table = build_table(runs, PAPER, defaults=_no_defaults, resamples=200)
    labels = [row.label for row in table.rows]
    assert "gru (train.lr=0.001)" in labels and "gru (train.lr=0.003)" in labels
    text = to_markdown(table)
    assert "† differs from the row gru (train.lr=0.001) (unmarked itself)" in text
    shown = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()
             if line.startswith("| gru")}
    assert "†" not in shown["gru (train.lr=0.001)"] and "†" in shown["gru (train.lr=0.003)"]
