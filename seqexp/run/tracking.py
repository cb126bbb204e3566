"""MLflow: run names, params, metrics, tags and artifacts. Nothing else imports mlflow
(seqexp.apps.report reads runs back through `Tracker.client`)."""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import logging
import os
import platform
import random
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from seqexp.core import liveness
from seqexp.core.errors import SeqexpError, message_line
from seqexp.core.file_modes import file_mode
from seqexp.core.flat_config import MAX_PARAM_LENGTH
from seqexp.core.metric_names import HEADLINE_METRICS, headline_metric, logged_name
from seqexp.core.source_git import source_git_info
from seqexp.core.version import __version__

log = logging.getLogger(__name__)

# The kind the MLflow 3 UI opens an experiment as (its JS bundle's ExperimentKind values:
# genai_development, custom_model_development and their *_inferred guesses): without the tag the
# UI guesses, and may open a GenAI experiment's traces page instead of the runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# MLflow 3.17.2's UI opens an experiment on its GenAI overview whatever that tag says, unless the
# address asks for the runs table (docs/tracking.md "Where the UI opens").
RUNS_TABLE_QUERY = "?workflowType=machine_learning"
# The runs tab's own route: the experiment's bare address redirects there and drops the view key.
RUNS_TABLE_ROUTE = "/runs"
# The runs table seqexp opens on: MLflow's shared view state (its "Share" button), an experiment
# tag `mlflow.sharedViewState.<key>` holding the table's search facets and UI state as JSON,
# applied when the address carries `viewStateShareKey=<key>` (MLflow's
# useSharedExperimentViewState; docs/tracking.md "Where the UI opens").
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
RUN_COLUMNS_TAGS = ("model", "dataset", "seed")
# Where `mlflow ui` serves by default (its --host and --port).
LOCAL_UI_ADDRESS = "http://127.0.0.1:5000"
# MLflow's standard run tags (mlflow.utils.mlflow_tags) that the UI shows as the run's source.
SOURCE_COMMIT_TAG = "mlflow.source.git.commit"
SOURCE_NAME_TAG = "mlflow.source.name"
SOURCE_TYPE_TAG = "mlflow.source.type"
USER_TAG = "mlflow.user"
# What MLflow records about a split's data (MetaDataset): the columns of the processed events.
DATASET_COLUMNS = ("user", "item", "timestamp")
# The tables of MLflow's first schema: when one is missing from a store, MLflow makes it again
# in that first form (mlflow.store.db.utils._initialize_tables), which later steps cannot use.
INITIAL_TABLES = ("experiments", "runs", "tags", "metrics", "params")
# SQLite answers "database is locked" when another process holds the write lock for longer than
# its busy timeout (5 s); parallel jobs retry for this long before giving up.
LOCK_RETRY_DEADLINE_S = 300.0
_LOCKED_MESSAGES = ("database is locked", "database table is locked")
T = TypeVar("T")
# How MLflow's REST client words a server's HTTP 401 (basic auth: no login, or a wrong one).
_UNAUTHENTICATED = "error code 401"
_FORBIDDEN = "error code 403"


class WriteForbidden(SeqexpError):
    """The tracking server refused a write (HTTP 403): the user may read, not edit."""


def _user_name_on_server() -> str:
    """The user MLflow's client logs in as (basic auth), '?' without one."""
    return os.environ.get("MLFLOW_TRACKING_USERNAME", "?")


def default_tracking_uri(launch_dir: Path) -> str:
    return f"sqlite:///{(Path(launch_dir) / 'mlflow.db').resolve()}"


def login_hint() -> str:
    """What to do when a tracking server answers 401: MLflow's client logs in with these."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user and os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        return (f"the server refused the login of user {user!r} (HTTP 401); check "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    return ("the server requires a login (HTTP 401); set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD to your user name and password on it")


def runs_view_key(cutoff: int) -> str:
    """The share key of seqexp's runs table sorted by test MRR@cutoff."""
    return f"seqexp-at-{int(cutoff)}"


def runs_view(cutoff: int) -> dict[str, Any]:
    """The runs table as MLflow's UI state: each run's model, dataset and seed tags, its test
    MRR, Recall and NDCG at `cutoff` and its MLflow Model; sorted by test MRR, best first.
    Column ids are MLflow's canonical keys, type.`name`."""
    metrics = [f"metrics.`{headline_metric(m, cutoff)}`" for m in HEADLINE_METRICS]
    columns = [*(f"tags.`{tag}`" for tag in RUN_COLUMNS_TAGS), *metrics]
    return {
        "searchFilter": "", "orderByKey": metrics[0], "orderByAsc": False,
        "startTime": "ALL", "lifecycleFilter": "Active", "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        # MLflow 3.17.2 orders the columns itself (attributes, metrics by name, then tags) and
        # applies a shared columnOrder only to a table drawn after the view arrives: none given.
        "selectedColumns": [*columns, "attributes.`Models`"],
        "runsExpanded": {}, "runsPinned": [], "runsHidden": [],
    }


def experiment_page(ui_address: str, experiment_id: str, cutoff: int | None = None) -> str:
    """The address of an experiment's runs table in the MLflow UI at `ui_address`; with a
    cutoff, in seqexp's view of it (runs_view), which Tracker.show_runs_view stores."""
    view = "" if cutoff is None else f"&viewStateShareKey={runs_view_key(cutoff)}"
    return (f"{ui_address.rstrip('/')}/#/experiments/{experiment_id}{RUNS_TABLE_ROUTE}"
            f"{RUNS_TABLE_QUERY}{view}")


def ui_hint(tracking_uri: str, experiment_id: str, cutoff: int | None = None) -> str:
    """How to look at an experiment of a store in the MLflow UI: a tracking server is its own
    UI, a local store is served by `mlflow ui` at its default address."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow UI: open {experiment_page(tracking_uri, experiment_id, cutoff)}"
    return (f"MLflow UI: mlflow ui --backend-store-uri {tracking_uri}, then open "
            f"{experiment_page(LOCAL_UI_ADDRESS, experiment_id, cutoff)}")


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///...` tracking URI as an absolute path, else None.

    SQLAlchemy's form, not a URL's: after `sqlite:///` comes a file path, relative to the
    working directory (`sqlite:///mlflow.db`) or absolute (`sqlite:////abs/mlflow.db`). A URL
    parser reads the second form's path as `//abs/mlflow.db`, whose `file:` URI MLflow then
    takes for a host name plus a path at the file-system root."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    database = tracking_uri[len(prefix):].split("?", 1)[0]
    if database in ("", ":memory:"):
        return None
    return Path(os.path.abspath(database))


def is_locked_error(exc: BaseException) -> bool:
    """MLflow wraps SQLAlchemy's OperationalError in its own exception: match on the text."""
    text = str(exc).lower()
    return any(message in text for message in _LOCKED_MESSAGES)


def with_lock_retry(call: Callable[..., T], *args: Any,
                    deadline_s: float = LOCK_RETRY_DEADLINE_S, **kwargs: Any) -> T:
    """call(*args, **kwargs), retried with jittered exponential backoff while SQLite reports a
    lock held by another writer. A failed write is rolled back, so retrying cannot duplicate it."""
    start, attempt = time.monotonic(), 0
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            if not is_locked_error(exc) or time.monotonic() - start > deadline_s:
                raise
            attempt += 1
            pause = min(0.05 * 2 ** attempt, 2.0) * (0.5 + random.random())
            log.debug("MLflow store locked (attempt %d); retrying in %.2f s", attempt, pause)
            time.sleep(pause)


@contextmanager
def mlflow_store(tracking_uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to `tracking_uri` for the block, the previous one
    afterwards. For the MLflow calls that take no store of their own or do not pass it on:
    Model.log, the registry, and the download of a logged model (runs:/<id>/model resolves to
    models:/<model id>, looked up in the global store)."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(tracking_uri):
        yield


@contextmanager
def store_setup_lock(tracking_uri: str) -> Iterator[None]:
    """Serialise the first contact with a SQLite store across processes: MLflow creates and
    migrates the schema on first use, and two processes doing that at once fail ("duplicate
    column name", "table already exists"). Other stores need no lock."""
    db = sqlite_path(tracking_uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.parent / f".{db.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            create_sqlite_store(db)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _creating_prefix(db: Path) -> str:
    return f".{db.name}.creating."


def create_sqlite_store(db: Path) -> None:
    """Make a new SQLite store safe against a kill: MLflow creates and migrates the schema in a
    temporary file beside `db`, renamed into place once complete, so `db` is either absent or
    whole. Called under store_setup_lock, so a temporary file found here was left by a killed
    creator and is removed. An existing store is checked for a half-made schema (a kill during
    an older seqexp's or MLflow's own creation in place), which no later open can repair."""
    for leftover in db.parent.glob(f"{_creating_prefix(db)}*"):
        leftover.unlink(missing_ok=True)
    if db.is_file() and db.stat().st_size > 0:
        problem = half_made_schema(db)
        if problem:
            raise SeqexpError(
                f"{db}: this MLflow store was left half-created by a process killed while "
                f"making it ({problem}); nothing can open it again: move it aside (mv {db} "
                f"{db}.broken) and run again, which creates a new store")
        missing = _missing_initial_table(db)
        if missing:  # MLflow would make it again in its first form, unusable
            raise damaged_store_error(f"sqlite:///{db}", f"its table {missing} is missing")
        return
    from mlflow.tracking import MlflowClient

    tmp = db.parent / f"{_creating_prefix(db)}{os.getpid()}"
    try:
        client = MlflowClient(f"sqlite:///{tmp}")
        client.search_experiments(max_results=1)  # creates every table and the Default one
        client._tracking_client.store.engine.dispose()  # no pooled handle on the moved file
        os.chmod(tmp, file_mode())  # MLflow's file has the mode of a new file, as open() gives
        os.replace(tmp, db)
    finally:
        for path in (tmp, tmp.with_name(f"{tmp.name}-journal")):
            path.unlink(missing_ok=True)


def half_made_schema(db: Path) -> str | None:
    """What shows that a store's schema creation or migration was cut short, else None: a
    table that Alembic's batch migrations make and drop within one step, or tables without the
    record of the schema version they are at."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
            tables = {row[0] for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            versions = (connection.execute("SELECT count(*) FROM alembic_version").fetchone()[0]
                        if "alembic_version" in tables else 0)
    except sqlite3.DatabaseError:
        return None  # not readable as SQLite: MLflow's own message says so
    temporary = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if temporary:
        return f"table {temporary[0]} of an unfinished migration"
    if tables and not versions:
        return "tables without a schema version"
    return None


def _missing_initial_table(db: Path) -> str | None:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
            tables = {row[0] for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError:
        return None  # not readable as SQLite: MLflow's own message says so
    return next((t for t in INITIAL_TABLES if tables and t not in tables), None)


def _sql_reason(exc: BaseException) -> str:
    """SQLAlchemy's line naming the database's own error, `(sqlite3.X) ...`."""
    lines = str(exc).splitlines()
    return next((line for line in lines if line.startswith("(sqlite3.")), lines[0])[:300]


def missing_tables(client: Any) -> list[str]:
    """The tables of MLflow's schema that an opened (so migrated) SQLite store lacks: a store
    damaged by hand or by a tool, which MLflow would only notice in the middle of a run."""
    from mlflow.store.db.base_sql_model import Base
    from sqlalchemy import inspect

    present = set(inspect(client._tracking_client.store.engine).get_table_names())
    return sorted(set(Base.metadata.tables) - present)


def store_failure_error(tracking_uri: str, reason: str, run_id: str | None) -> SeqexpError:
    """The one line for a store call that failed: a full disk said as such (where, how much is
    free, what to do), a damaged store only where its schema lacks a table or SQLite's
    integrity check fails (then moving it aside is the advice), else the failure as it is."""
    db = sqlite_path(tracking_uri)
    lowered = reason.lower()
    if "disk is full" in lowered or "no space left" in lowered:
        where = db.parent if db is not None else None
        free = (f"{shutil.disk_usage(where).free / 2**20:.1f} MiB free on the device of {where}"
                if where is not None and where.is_dir() else "the server's disk is full")
        resume = f", then continue with resume={run_id}" if run_id else ""
        return SeqexpError(f"mlflow.tracking_uri={tracking_uri}: no space left for the MLflow "
                           f"store ({reason}; {free}); free some space there{resume}")
    if db is None or "no such table" in lowered or not sqlite_intact(db):
        return damaged_store_error(tracking_uri, reason)
    return SeqexpError(f"mlflow.tracking_uri={tracking_uri}: the MLflow store failed ({reason}); "
                       f"its file passes SQLite's integrity check, so it is not damaged: run "
                       f"again")


def sqlite_intact(db: Path) -> bool:
    """Whether SQLite's own integrity check passes on the database file `db` (read-only)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as connection:
            return connection.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    except sqlite3.Error:
        return False


def damaged_store_error(tracking_uri: str, reason: str) -> SeqexpError:
    """The one line for a store that cannot be used: what is wrong and, for a SQLite file, how
    to start afresh."""
    db = sqlite_path(tracking_uri)
    advice = (f"move it aside (mv {db} {db}.broken) and run again, which creates a new store"
              if db is not None else "check the tracking server")
    return SeqexpError(f"mlflow.tracking_uri={tracking_uri}: the MLflow store is damaged "
                       f"({reason}); {advice}")


_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # seqexp/, above run/
# Written into the wheel by hatch_build.py: the commit a non-editable install was built from.
BUILD_INFO = _PACKAGE_DIR / "_build_git.json"


def git_tags() -> dict[str, str]:
    """The commit of seqexp's own code (not of the folder a run was launched from): its
    checkout's for a source or editable install, the build's for a wheel; else "unknown"."""
    found = source_git_info(_PACKAGE_DIR.parent)
    if found is None and BUILD_INFO.is_file():
        try:
            found = {k: str(v) for k, v in json.loads(BUILD_INFO.read_text()).items()}
        except (OSError, ValueError):
            found = None
    return found or {"git_sha": "unknown", "git_dirty": "unknown"}


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment_tags(device: str = "cpu") -> dict[str, str]:
    """What a run ran on and with: Python, torch, CUDA and cuDNN versions, the GPU's name (on
    CUDA) or the CPU's model, torch's CPU threads and seqexp's version."""
    import torch  # only here: `import seqexp.run.tracking` stays light

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    tags = {
        "env.python": platform.python_version(),
        "env.torch": torch.__version__,
        "env.cuda": torch.version.cuda or "none",
        "env.cudnn": str(cudnn) if cudnn else "none",
        "env.cpu": cpu_model(),
        "env.threads": str(torch.get_num_threads()),
        "env.seqexp": __version__,
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        tags["env.gpu"] = torch.cuda.get_device_name(index)
        tags["env.gpu_count"] = str(torch.cuda.device_count())
    return tags


def entry_point(argv0: str | None = None) -> str:
    """The program a run was started with, as its user typed it: seqexp's console script
    (`seqexp`, `seqexp-report`, ...) also when started as `python -m seqexp.apps.cli`; else the
    file name of sys.argv[0] (`pytest`, a script), else "python"."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    if not argv0:
        return "python"
    started = Path(argv0)
    try:
        scripts = [ep for ep in metadata.entry_points(group="console_scripts")
                   if ep.dist is not None and ep.dist.name == "seqexp"]
    except Exception:  # a broken environment's metadata: the plain file name
        scripts = []
    for script in scripts:
        module = script.module.replace(".", "/")
        if started.name == script.name or started.with_suffix("").as_posix().endswith(module):
            return script.name
    return started.name or "python"


def _user_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry or $USER
        return "unknown"


def source_tags(git_sha: str | None = None) -> dict[str, str]:
    """MLflow's standard source tags, which its UI shows in the runs table and on the run's page:
    seqexp's commit (git_sha, else git_tags()'s), the entry point, LOCAL, and the user."""
    sha = git_sha if git_sha is not None else git_tags()["git_sha"]
    tags = {SOURCE_NAME_TAG: entry_point(), SOURCE_TYPE_TAG: "LOCAL", USER_TAG: _user_name()}
    if sha != "unknown":
        tags[SOURCE_COMMIT_TAG] = sha
    return tags


@dataclass(frozen=True)
class SplitDataset:
    """One split of a run's data as an MLflow dataset input (seqexp.run.datasets builds them).
    Plain values: this module imports neither the data pipeline nor, until it logs, MLflow."""

    context: str  # MLflow's mlflow.data.context input tag: training, validation or test
    name: str  # the dataset preset (dataset.name)
    digest: str  # the same for the same data, split and preprocessing
    source_file: Path | None  # the raw file; None for generated data
    generator: Mapping[str, Any] = field(default_factory=dict)  # the generator's settings
    profile: Mapping[str, Any] = field(default_factory=dict)  # counts of events, users, items


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Tracker:
    """One MLflow run, driven through MlflowClient (no global active-run state). Every store
    call goes through `with_lock_retry`, so parallel jobs can share one SQLite file."""

    def __init__(self, tracking_uri: str, experiment: str | None, run_id: str | None = None,
                 create: bool = True) -> None:
        """experiment: its name, created unless create=False (then a missing one is an error);
        None for a tracker that only reads runs, or writes to run_id."""
        import mlflow  # noqa: F401 - imported lazily: it takes seconds
        from mlflow.tracking import MlflowClient

        # MLflow logs a failed SQL statement with its traceback, then raises it: the raised
        # error is what seqexp reports, in one line.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.experiment_id: str | None = None
        db = sqlite_path(tracking_uri)
        if not create and db is not None and not db.is_file():  # a reader makes no new store
            raise SeqexpError(f"mlflow.tracking_uri={tracking_uri}: there is no MLflow store "
                              f"at {db}; name the mlflow.db of the folder seqexp ran in")
        try:
            with store_setup_lock(tracking_uri):
                self.client = MlflowClient(tracking_uri)
                if db is not None:
                    missing = missing_tables(self.client)
                    if missing:
                        raise damaged_store_error(tracking_uri, f"its table {missing[0]} is "
                                                                f"missing")
                if experiment is None:
                    # The first query creates (or migrates) the schema, inside the lock.
                    with_lock_retry(self.client.search_experiments, max_results=1)
                elif create:
                    self.experiment_id = with_lock_retry(self._experiment_id, experiment)
                else:
                    found = with_lock_retry(self.client.get_experiment_by_name, experiment)
                    self.experiment_id = found.experiment_id if found is not None else None
        except SeqexpError:
            raise
        except Exception as exc:  # any store failure becomes one clear line
            reason = message_line(exc)
            if _UNAUTHENTICATED in reason:
                raise SeqexpError(f"mlflow.tracking_uri={tracking_uri}: {login_hint()}") from None
            raise SeqexpError(
                f"mlflow.tracking_uri={tracking_uri}: cannot open the tracking store ({reason})"
            ) from None
        if experiment is not None and self.experiment_id is None:
            raise SeqexpError(f"no MLflow experiment named {experiment!r} in {tracking_uri}")
        self.run_id = run_id
        self._system_monitor: Any = None  # MLflow's SystemMetricsMonitor while one runs

    def failure(self, exc: BaseException) -> SeqexpError | None:
        """The one line for a store call that failed in the middle of a run (a SQLite file
        damaged on disk, a server gone), else None: the error is not the store's."""
        from mlflow.exceptions import MlflowException
        from sqlalchemy.exc import SQLAlchemyError

        if not isinstance(exc, (MlflowException, SQLAlchemyError, sqlite3.Error)):
            return None
        return store_failure_error(self.tracking_uri, message_line(exc, which=-1, limit=300)
                                   if "Background on this error" not in str(exc) else
                                   _sql_reason(exc), self.run_id)

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            self._mark_kind(found)
            return found.experiment_id
        location = None
        db = sqlite_path(self.tracking_uri)
        if db is not None:
            # Artifacts next to the database, whatever the working directory.
            location = (db.parent / "mlartifacts" / name).as_uri()
        try:
            return self.client.create_experiment(
                name, artifact_location=location,
                tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
        except Exception:  # created meanwhile by a parallel run
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            self._mark_kind(found)
            return found.experiment_id

    def _mark_kind(self, experiment: Any) -> None:
        """Give an existing experiment without a kind (made by an older seqexp or by hand) the
        model-training kind; a kind someone chose is kept. A store that refuses the tag (a
        server user without MANAGE permission) costs only the UI's first page, not the run."""
        if EXPERIMENT_KIND_TAG in (experiment.tags or {}):
            return
        try:
            with_lock_retry(self.client.set_experiment_tag, experiment.experiment_id,
                            EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        except Exception as exc:  # cosmetic: logged, and the run goes on
            log.warning("could not mark MLflow experiment %s as %s: %s", experiment.name,
                        MODEL_TRAINING_KIND, message_line(exc))

    def show_runs_view(self, cutoff: int) -> None:
        """Store seqexp's runs table (runs_view) in the experiment, for the address
        experiment_page(..., cutoff). A store that refuses the tag (a server user without
        MANAGE permission) costs only the view, not the run."""
        tag = SHARED_VIEW_TAG_PREFIX + runs_view_key(cutoff)
        try:
            with_lock_retry(self.client.set_experiment_tag, self.experiment_id, tag,
                            json.dumps(runs_view(cutoff), separators=(",", ":")))
        except Exception as exc:  # cosmetic: logged, and the run goes on
            log.warning("could not store the runs table view in MLflow experiment %s: %s",
                        self.experiment, message_line(exc))

    def start(self, name: str, tags: Mapping[str, str]) -> str:
        """A new run named `name` with `tags` and MLflow's source tags (`tags` win)."""
        tags = {**source_tags(tags.get("git_sha")), **tags}
        try:
            run = with_lock_retry(self.client.create_run, self.experiment_id, run_name=name,
                                  tags=tags)
        except Exception as exc:  # e.g. a server's 403: one clear line
            reason = message_line(exc)
            if _FORBIDDEN in reason:
                raise WriteForbidden(
                    f"mlflow.experiment={self.experiment}: user {_user_name_on_server()!r} may "
                    f"not create runs in it on {self.tracking_uri} (HTTP 403); ask the server's "
                    f"admin for EDIT permission or choose another mlflow.experiment") from None
            raise SeqexpError(f"mlflow.tracking_uri={self.tracking_uri}: cannot start a run "
                              f"({reason})") from None
        self.run_id = run.info.run_id
        log.info("MLflow run %s (%s) in %s", name, self.run_id, self.tracking_uri)
        return self.run_id

    def resume(self, run_id: str, tags: Mapping[str, str]) -> str:
        """Continue an ended (or abandoned) run: status back to RUNNING, `tags` updated. The
        tracker's experiment becomes the run's: `resume=<run id>` may name a run of another
        experiment than mlflow.experiment (a key that does not change results)."""
        with_lock_retry(self.client.update_run, run_id, status="RUNNING")
        self.experiment_id = with_lock_retry(self.client.get_run, run_id).info.experiment_id
        self.experiment = with_lock_retry(self.client.get_experiment, self.experiment_id).name
        self.run_id = run_id
        self.set_tags(tags)
        log.info("MLflow run %s continued in %s", run_id, self.tracking_uri)
        return run_id

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for chunk in _chunks(items, 100):
            with_lock_retry(self.client.log_batch, self.run_id, params=chunk)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0,
                    headline_cutoff: int | None = None) -> None:
        """`metrics` by their flat names, logged under their sectioned MLflow names
        (seqexp.core.metric_names), the test metrics at `headline_cutoff` (eval.monitor_cutoff)
        as the headline."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(logged_name(k, headline_cutoff), float(v), stamp, step)
                 for k, v in metrics.items()]
        for chunk in _chunks(items, 500):
            with_lock_retry(self.client.log_batch, self.run_id, metrics=chunk)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        with_lock_retry(self.client.log_batch, self.run_id,
                        tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Log a file or a folder's files; a server's 403 is WriteForbidden."""
        path = Path(path)
        log_one = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        if not path.exists():
            return
        try:
            with_lock_retry(log_one, self.run_id, str(path), artifact_path)
        except Exception as exc:
            if _FORBIDDEN in message_line(exc):
                raise WriteForbidden(
                    f"user {_user_name_on_server()!r} may not write to run {self.run_id} on "
                    f"{self.tracking_uri} (HTTP 403)") from None
            raise

    def search(self, filter_string: str = "", experiment_ids: Sequence[str] | None = None
               ) -> list:
        """Every run (all pages) of this or the given experiments that matches filter_string."""
        runs, token = [], None
        while True:
            page = with_lock_retry(self.client.search_runs,
                                   list(experiment_ids or [self.experiment_id]), filter_string,
                                   max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def all_experiment_ids(self) -> list[str]:
        ids, token = [], None
        while True:
            page = with_lock_retry(self.client.search_experiments, max_results=1000,
                                   page_token=token)
            ids.extend(e.experiment_id for e in page)
            token = page.token
            if not token:
                return ids

    def log_datasets(self, datasets: Sequence[SplitDataset]) -> None:
        """The run's inputs, one MLflow dataset per split (the UI's Datasets column and the
        run page's Datasets section), each tagged with its mlflow.data.context."""
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.types import ColSpec, DataType, Schema

        schema = Schema([ColSpec(DataType.long, column) for column in DATASET_COLUMNS])
        inputs = []
        for split in datasets:
            if split.source_file is not None:  # a local file: MLflow's "local" source, its URI
                source = LocalArtifactDatasetSource(Path(split.source_file).resolve().as_uri())
            else:
                source = CodeDatasetSource({"generator": "seqexp.data.synthetic",
                                            **{k: str(v) for k, v in split.generator.items()}})
            entity = MetaDataset(source, name=split.name, digest=split.digest,
                                 schema=schema)._to_mlflow_entity()
            # MetaDataset has no profile; MLflow's entity keeps it as a JSON text.
            entity = Dataset(name=entity.name, digest=entity.digest,
                             source_type=entity.source_type, source=entity.source,
                             schema=entity.schema,
                             profile=json.dumps(dict(split.profile), sort_keys=True))
            inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context",
                                                              split.context)]))
        with_lock_retry(self.client.log_inputs, self.run_id, datasets=inputs)

    def monitor_system(self, resumed: bool = False) -> None:
        """Log CPU, memory, disk, network and (with nvidia-ml-py) GPU use as system/* metrics
        with MLflow's SystemMetricsMonitor until `end`; a continued run goes on from its last
        step. Sampled every 10 s unless MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says otherwise."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._system_monitor = SystemMetricsMonitor(
            self.run_id, resume_logging=resumed, tracking_uri=self.tracking_uri)
        self._system_monitor.start()

    def _stop_system_monitor(self) -> None:
        """Stop the monitor and log what it sampled since its last logging, which MLflow's
        finish() drops: a run shorter than one interval still gets its system metrics."""
        monitor, self._system_monitor = self._system_monitor, None
        if monitor is None:
            return
        try:
            monitor.finish()
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as exc:  # monitoring must not cost the run
            log.warning("could not log the last system metrics: %s", message_line(exc))

    def end(self, status: str) -> None:
        """status: FINISHED, FAILED or KILLED. Stops the system metrics monitor first."""
        self._stop_system_monitor()
        if self.run_id is not None:
            with_lock_retry(self.client.set_terminated, self.run_id, status=status)


# The process behind a run (seqexp.core.liveness): a later seqexp on the same host closes the run of
# a process that is gone (SIGKILL, a power cut) instead of leaving it RUNNING forever.
ABANDONED_TAG = "failure_reason"


def process_tags() -> dict[str, str]:
    """The tags host, pid and pid_start of this process (seqexp.core.liveness)."""
    return liveness.identity()


OUTPUTS_TAG = "outputs_dir"  # the run's outputs folder (checkpoints/, metrics.json, ...)
# In a run's outputs folder: the error that ended a run the store could not mark (its disk
# full), for the later seqexp that closes the run.
UNRECORDED_FAILURE = ".seqexp-run-failure"


_KILLED = "killed, e.g. by SIGKILL or the out-of-memory killer"


def record_unrecorded_failure(outputs: Path, line: str) -> None:
    """Keep `line` beside the run for close_abandoned_runs; best effort (the same disk may be
    full)."""
    with contextlib.suppress(OSError):
        (outputs / UNRECORDED_FAILURE).write_text(line[:4000])


def unrecorded_failure(tags: dict[str, str]) -> str | None:
    """The error a run's process kept in its outputs folder, if any."""
    folder = tags.get(OUTPUTS_TAG)
    if not folder:
        return None
    try:
        return (Path(folder) / UNRECORDED_FAILURE).read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def close_abandoned_runs(tracker: Tracker) -> list[str]:
    """Mark FAILED, with a reason tag, every RUNNING run of the store whose process ran on this
    host and has ended (pid gone, or reused by a later process); runs of other hosts and runs
    without process tags are left alone. Returns their ids."""
    from mlflow.entities import RunTag

    closed = []
    query = f"attributes.status = 'RUNNING' and tags.host = '{liveness.host()}'"
    for run in tracker.search(query, tracker.all_experiment_ids()):
        tags = run.data.tags
        if not liveness.is_gone(tags.get("host", ""), tags.get("pid", ""),
                                tags.get("pid_start", "")):
            continue
        process = f"process {tags['pid']} on {tags['host']}"
        reason = (f"{process} ended without closing the run "
                  f"({unrecorded_failure(tags) or _KILLED})")
        with_lock_retry(tracker.client.log_batch, run.info.run_id,
                        tags=[RunTag(ABANDONED_TAG, reason)])
        with_lock_retry(tracker.client.set_terminated, run.info.run_id, status="FAILED")
        log.warning("MLflow run %s was left RUNNING by %s; marked FAILED", run.info.run_id,
                    process)
        closed.append(run.info.run_id)
    return closed
