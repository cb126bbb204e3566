"""seqexp-report on hand-made runs: grouping, mean ± std over seeds, the paper's numbers and the
difference, the four files, and where they are logged."""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from seqexp.report import RunRecord, build_table, load_paper, main, to_csv, to_latex, to_markdown
from seqexp.tracking import Tracker

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
        tracker.log_metrics({"test_mrr_at_20": mrr, "test_recall_at_20": recall})
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
    assert (tmp_path / "again" / "table2.md").read_text() == files["table2.md"].read_text()


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
