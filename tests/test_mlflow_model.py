"""A run's model as an MLflow Model: logged by every run (a LoggedModel linked to it, pyfunc
from code, the checkpoint as its artifact), predicted with mlflow.pyfunc as seqexp-recommend
does, served by `mlflow models serve`, registered, loaded by seqexp.load from runs:/, models:/
and its folder, and refused when crafted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_recommend_security import CRAFTED, TAMPERED_VALUES, _rewrite

import seqexp
from helpers import compose_config, tiny_overrides
from seqexp.apps.recommend import main
from seqexp.core.errors import SeqexpError
from seqexp.run.experiment import run_experiment
from seqexp.run.mlflow_model import pip_requirements
from seqexp.run.tracking import mlflow_store

REGISTERED = "tiny-gru"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread for this module (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """One tiny gru run (its model registered) and one pop run in a store of their own."""
    root = tmp_path_factory.mktemp("mlflow-model")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    runs = {}
    for name, extra in (("gru", ["model=gru", "model.hidden_size=8",
                                 f"mlflow.register_model={REGISTERED}"]),
                        ("pop", ["model=pop"])):
        cfg = compose_config([*tiny_overrides(root / "data", root / "mlflow.db", log_model=True),
                              *extra])
        runs[name] = run_experiment(cfg, launch_dir=root, output_dir=root / name).run_id
    return {"root": root, "uri": uri, "client": MlflowClient(uri), **runs}


def _download(store: dict, uri: str, dest: Path) -> Path:
    with mlflow_store(store["uri"]):  # MLflow looks a run's logged model up in its global one
        return Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dest)))


def _cli_table(argv: list[str], capsys) -> pd.DataFrame:
    """seqexp-recommend's printed table, read back."""
    capsys.readouterr()
    main(argv)
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[1:]]
    assert lines[0].split() == ["rank", "item", "score"]
    return pd.DataFrame({"rank": [int(r[0]) for r in rows], "item": [r[1] for r in rows],
                         "score": [float(r[2]) for r in rows]})


@pytest.mark.parametrize("name", ["gru", "pop"])
def test_every_run_logs_its_model_as_an_mlflow_model_from_code(name, store, tmp_path):
    client, run_id = store["client"], store[name]
    run = client.get_run(run_id)
    outputs = run.outputs.model_outputs
    assert len(outputs) == 1  # the UI's Models column
    logged = client.get_logged_model(outputs[0].model_id)
    assert (logged.name, logged.source_run_id, str(logged.status)) == ("model", run_id, "READY")
    assert logged.experiment_id == run.info.experiment_id
    folder = _download(store, f"runs:/{run_id}/model", tmp_path)
    spec = yaml.safe_load((folder / "MLmodel").read_text())
    pyfunc = spec["flavors"]["python_function"]
    assert pyfunc["model_code_path"].endswith("mlflow_model_code.py")  # models from code
    assert pyfunc["artifacts"]["checkpoint"]["path"] == "artifacts/best.pt"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    assert (folder / "artifacts" / "best.pt").read_bytes() == (
        store["root"] / name / "checkpoints" / "best.pt").read_bytes()
    inputs = json.loads(spec["signature"]["inputs"])
    assert [(c["name"], c.get("required", True)) for c in inputs] == [
        ("user", False), ("k", True), ("items", False), ("exclude_seen", False)]
    assert [c["name"] for c in json.loads(spec["signature"]["outputs"])] == [
        "request", "rank", "item", "score"]
    example = json.loads((folder / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["user", "k"]
    assert (folder / "requirements.txt").read_text().split() == pip_requirements()


def test_pyfunc_predict_answers_what_seqexp_recommend_prints(store, capsys, monkeypatch):
    uri, run_id = store["uri"], store["gru"]
    local = seqexp.load(run_id, uri)  # the run's outputs folder: not the model's artifact
    user, other = local.user_ids[0], local.user_ids[7]
    history = local.item_ids[3:6]
    # rows as a server parses them: a key a row lacks is NaN in it
    requests = pd.DataFrame.from_records([
        {"user": user, "k": 5}, {"k": 4, "items": history, "exclude_seen": True},
        {"user": other, "k": 3, "items": history, "exclude_seen": False}])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    answer = model.predict(requests)
    with pytest.raises(mlflow.exceptions.MlflowException, match="items='a,b' is not a list"):
        model.predict(pd.DataFrame({"user": [user], "k": [3], "items": ["a,b"]}))
    assert list(answer.columns) == ["request", "rank", "item", "score"]
    assert list(answer["request"]) == [0] * 5 + [1] * 4 + [2] * 3
    expected = [
        _cli_table([run_id, "--user", user, "--k", "5", "--tracking-uri", uri], capsys),
        _cli_table([run_id, "--items", ",".join(history), "--k", "4", "--exclude-seen",
                    "--tracking-uri", uri], capsys),
        _cli_table([run_id, "--user", other, "--items", ",".join(history), "--k", "3",
                    "--tracking-uri", uri], capsys),
    ]
    for number, table in enumerate(expected):
        got = answer[answer["request"] == number]
        assert list(got["rank"]) == list(table["rank"])
        assert list(got["item"]) == list(table["item"])
        assert got["score"].round(5).tolist() == table["score"].tolist()
    assert not set(history) & set(answer[answer["request"] == 1]["item"])
    # the in-memory answer too, to the last bit: the same checkpoint, the same code
    pd.testing.assert_frame_equal(
        answer[answer["request"] == 0].drop(columns="request").reset_index(drop=True),
        local.recommend(user=user, k=5))


def test_the_registered_model_and_the_uris_load_with_seqexp_load(store, tmp_path):
    uri, run_id = store["uri"], store["gru"]
    version = store["client"].get_model_version(REGISTERED, "1")
    assert version.run_id == run_id
    expected = seqexp.load(store["root"] / "gru").recommend(user="3", k=6)
    folder = _download(store, f"runs:/{run_id}/model", tmp_path)
    for source in (f"models:/{REGISTERED}/1", f"runs:/{run_id}/model", folder):
        pd.testing.assert_frame_equal(seqexp.load(source, uri).recommend(user="3", k=6),
                                      expected)


def test_a_run_without_a_model_logs_none_and_registering_needs_one(tmp_path):
    assert compose_config([]).mlflow.log_model is True  # off only where asked for
    cfg = compose_config(["model=pop", *tiny_overrides(tmp_path / "data", tmp_path / "m.db"),
                          "mlflow.log_model=false"])
    run_id = run_experiment(cfg, launch_dir=tmp_path, output_dir=tmp_path / "pop").run_id
    run = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").get_run(run_id)
    assert run.outputs is None or not run.outputs.model_outputs
    cfg.mlflow.register_model = "x"
    with pytest.raises(SeqexpError, match="mlflow.register_model=x needs the run's MLflow Model"):
        run_experiment(cfg, launch_dir=tmp_path, output_dir=tmp_path / "pop2")


@pytest.fixture
def scratch_tmp(tmp_path, monkeypatch) -> Path:
    """An empty TMPDIR of its own, read again by tempfile."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert tempfile.gettempdir() == str(scratch)
    # main() turns MLflow's download bar off (setdefault): put the variable back afterwards
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "recorded")
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    return scratch


def test_loading_a_downloaded_model_leaves_no_temporary_folder(store, scratch_tmp, capsys):
    uri, run_id, client = store["uri"], store["pop"], store["client"]
    # The run's outputs folder "elsewhere": its id goes through the logged model.
    gone = client.get_run(run_id).data.tags["outputs_dir"]
    client.set_tag(run_id, "outputs_dir", str(store["root"] / "not-here"))
    try:
        for source in (run_id, f"runs:/{run_id}/model"):
            table = _cli_table([source, "--user", "0", "--k", "3", "--tracking-uri", uri],
                               capsys)
            assert len(table) == 3
            assert list(scratch_tmp.iterdir()) == []
            assert seqexp.load(source, uri).item_ids
            assert list(scratch_tmp.iterdir()) == []
        table = _cli_table([f"models:/{REGISTERED}/1", "--user", "0", "--tracking-uri", uri],
                           capsys)
        assert len(table) == 20 and list(scratch_tmp.iterdir()) == []
    finally:
        client.set_tag(run_id, "outputs_dir", gone)


def _one_line(argv: list[str], capsys) -> str:
    capsys.readouterr()  # what came before: the test's own downloads
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("seqexp-recommend: error: ") and err.count("\n") == 1
    return err


def test_a_crafted_mlflow_model_is_refused_and_runs_nothing(store, tmp_path, scratch_tmp,
                                                            capsys):
    """The exploit of a crafted checkpoint (pandas.read_pickle of a pickle that creates a
    file), put into an MLflow Model: refused by seqexp.load from its folder and from runs:/,
    by seqexp-recommend, and by MLflow's own pyfunc loader (which runs seqexp's code file)."""
    marker = tmp_path / "marker"
    folder = _download(store, f"runs:/{store['gru']}/model", tmp_path / "crafted")
    checkpoint = folder / "artifacts" / "best.pt"
    _rewrite(checkpoint, checkpoint, lambda model: CRAFTED["read_pickle"](model, marker))
    named = "model.dropout holds _target_ (pandas.read_pickle)"
    with pytest.raises(SeqexpError) as refused:
        seqexp.load(folder)
    assert named in str(refused.value) and "\n" not in str(refused.value)
    assert str(checkpoint) in str(refused.value)
    with pytest.raises(Exception, match=r"model\.dropout holds _target_"):
        mlflow.pyfunc.load_model(str(folder))
    client = store["client"]
    crafted_run = client.create_run(client.get_run(store["gru"]).info.experiment_id).info.run_id
    client.log_artifacts(crafted_run, str(folder), "model")
    err = _one_line([f"runs:/{crafted_run}/model", "--user", "0", "--tracking-uri",
                     store["uri"]], capsys)
    assert f"runs:/{crafted_run}/model (its checkpoint): {named}" in err
    assert not marker.exists()
    assert list(scratch_tmp.iterdir()) == []


@pytest.mark.parametrize("name", sorted(TAMPERED_VALUES))
def test_mlflows_loader_refuses_a_tampered_value_in_one_line(name, store, tmp_path):
    """mlflow.pyfunc.load_model (what `mlflow models serve` runs) raises seqexp's one line,
    naming the checkpoint and the key, before the model is built."""
    key, value, named = TAMPERED_VALUES[name]
    folder = _download(store, f"runs:/{store['gru']}/model", tmp_path / "tampered")
    checkpoint = folder / "artifacts" / "best.pt"
    _rewrite(checkpoint, checkpoint, lambda model: model.update({key: value}))
    with pytest.raises(SeqexpError) as refused:
        mlflow.pyfunc.load_model(str(folder))
    message = str(refused.value)
    assert message.startswith(f"{checkpoint}: ") and named in message and "\n" not in message


def test_an_mlflow_model_whose_checkpoint_is_outside_its_folder_is_refused(store, tmp_path,
                                                                          capsys):
    folder = _download(store, f"runs:/{store['pop']}/model", tmp_path / "m")
    spec = yaml.safe_load((folder / "MLmodel").read_text())
    spec["flavors"]["python_function"]["artifacts"]["checkpoint"]["path"] = "../../best.pt"
    shutil.copy(folder / "artifacts" / "best.pt", tmp_path / "best.pt")
    (folder / "MLmodel").write_text(yaml.safe_dump(spec))
    err = _one_line([str(folder), "--user", "0"], capsys)
    assert "its checkpoint artifact '../../best.pt' is not a file inside the model folder" in err
    del spec["flavors"]["python_function"]["artifacts"]
    (folder / "MLmodel").write_text(yaml.safe_dump(spec))
    assert "not a seqexp MLflow Model" in _one_line([str(folder), "--user", "0"], capsys)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow  # starts `mlflow models serve` (gunicorn or uvicorn), ~20 s
def test_mlflow_models_serve_answers_the_same_top_k(store, tmp_path):
    uri, run_id = store["uri"], store["gru"]
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/model",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        env=dict(os.environ, MLFLOW_TRACKING_URI=uri), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        local = seqexp.load(run_id, uri)
        history = local.item_ids[3:6]
        status, body = _post(f"{base}/invocations", {"dataframe_records": [
            {"user": "3", "k": 5}, {"user": "5", "k": 3, "items": history}]})
        assert status == 200, body
        answer = pd.DataFrame(body["predictions"])
        for number, expected in enumerate([local.recommend(user="3", k=5),
                                           local.recommend(user="5", items=history, k=3)]):
            got = answer[answer["request"] == number].reset_index(drop=True)
            assert list(got["item"]) == list(expected["item"])
            pd.testing.assert_series_equal(got["score"], expected["score"], rtol=1e-6)
        status, body = _post(f"{base}/invocations",
                             {"dataframe_records": [{"user": "nobody", "k": 5}]})
        assert status == 400 and "user 'nobody' is not a user" in body["message"]
        # values the signature's types would coerce: refused, not cut or read as true
        for record, message in (({"user": "3", "k": 2.5}, "k=2.5 is not a whole number"),
                                ({"user": "3", "k": 3, "exclude_seen": "yes"},
                                 "exclude_seen='yes' is not true or false")):
            status, body = _post(f"{base}/invocations", {"dataframe_records": [record]})
            assert status == 400 and message in body["message"], (record, body)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
