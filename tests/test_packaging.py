"""The config tree is found from a built wheel used outside the repository (Hydra issue 559:
config_path relative to a module breaks once the package is installed elsewhere)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # builds and installs a wheel; CI's `pip install . && seqexp` runs one too
def test_wheel_carries_the_config_tree_and_seqexp_composes_from_it(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(tmp_path.glob("seqexp-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(site)
    for config in ("config.yaml", "model/gru.yaml", "model/itemknn.yaml",
                   "dataset/synthetic.yaml", "split/global_time.yaml", "experiment/table2.yaml",
                   "hydra/launcher/slurm.yaml", "hparams_search/optuna.yaml"):
        assert f"seqexp/conf/{config}" in names, config
    assert "seqexp/table2_paper.csv" in names  # seqexp-report's side-by-side numbers
    (entry_points,) = site.glob("seqexp-*.dist-info/entry_points.txt")
    assert "seqexp-report = seqexp.apps.report:main" in entry_points.read_text()
    assert "seqexp-recommend = seqexp.apps.recommend:main" in entry_points.read_text()
    # Launched from a user's own repository: runs are tagged with seqexp's commit, the one the
    # wheel was built from, never the launch folder's.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    for git in (["init", "-q"], ["-c", "user.name=u", "-c", "user.email=u@x", "commit", "-q",
                                 "--allow-empty", "-m", "user's project"]):
        subprocess.run(["git", *git], cwd=elsewhere, env=env, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
    shown = subprocess.run(
        [sys.executable, "-c",
         "import sys, seqexp.core.resources as r, seqexp.apps.cli as c, seqexp.run.tracking as t;"
         "print(r.config_dir()); print(t.git_tags()['git_sha']);"
         "sys.argv=['seqexp','--cfg','job','model=itemknn']; c.main()"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    first, sha, rest = shown.stdout.split("\n", 2)
    assert Path(first) == site / "seqexp" / "conf"
    assert sha == head
    assert "name: itemknn" in rest and "name: synthetic" in rest
