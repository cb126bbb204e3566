"""The docs describe the software as it is.

- Every `seqexp ...` command in README.md and docs/*.md (shell code blocks, with line
  continuations, environment prefixes and `&&` chains, and inline code) runs through seqexp's
  own entry point, `seqexp.apps.cli.main`, with `--cfg job` added: its checks of the command line
  (unknown keys and options, missing plugins, keys whose value is `???`), then Hydra's main.
  A `-m` command is checked whole by the same pre-flight, then expanded into jobs: every value
  of every key it sweeps is run at least once, together with all its fixed overrides (not every
  combination, which would be slow and adds little). The jobs a preset sweeps by itself
  (experiment=table2, hparams_search=...) are conf's, checked in tests/test_presets.py.
- Files a page declares in a fenced block (```yaml conf/model/x.yaml) are added to a copy of
  conf/; the package of docs/adding-a-model.md (declared under my-models/) is installed as the
  page says, its test run, and its model trained through `seqexp`.
- Every repository path and config key named in inline code exists.
- README.md stays at most 200 lines.
"""

from __future__ import annotations

import copy
import importlib
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

import conformance
import seqexp.apps.cli
import seqexp.apps.preflight
import seqexp.core.resources
from helpers import run_seqexp, tiny_overrides
from plugin_package import install_package
from seqexp.core.metric_names import flat_metrics
from seqexp.core.resources import config_dir
from seqexp.run import tags
from seqexp.run.registry import registry

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200
EXAMPLE_PROJECT = "my-models"  # docs/adding-a-model.md's package, files declared under it
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
OPERATORS = {"&&", "||", ";", "|", "&"}
# Written on other branches of this change; a missing one is not a broken link until then.
PAGES_FROM_OTHER_BRANCHES = {"docs/real-data.md", "docs/significance.md"}
# scripts that scripts/device_check.sh and docs/benchmarks.md name, written on the bench branch
# merged with this one (the paper-shaped raw files and their per-phase benchmark)
# Inline code that looks like a config key but is not one.
NOT_KEYS = {"mlflow.db",  # the default SQLite store
            "mlflow.user"}  # MLflow's run tag of the user (docs/tracking.md)
CONFIG_KEY = re.compile(r"^(model|dataset|split|train|eval|mlflow|paths)\.([a-z_][a-z0-9_]*)"
                        r"(=.*)?$")
REPO_PATH = re.compile(r"^(conf|seqexp|scripts|tests|docs|\.ci)/[\w./-]*$")


def page_name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def fenced_blocks(text: str) -> Iterator[tuple[str, str, int]]:
    """(info string, body, line number of the body's first line) of every fenced block."""
    for match in FENCE.finditer(text):
        yield match.group(1).strip(), match.group(2), text.count("\n", 0, match.start(2)) + 1


def shell_lines(text: str) -> Iterator[tuple[int, str]]:
    """Logical lines of the shell blocks (continuations joined), then inline code outside them."""
    for info, body, first in fenced_blocks(text):
        if info.split()[:1] and info.split()[0] not in SHELL_LANGUAGES:
            continue
        lines = body.split("\n")
        number = 0
        while number < len(lines):
            start, line = number, lines[number]
            while line.endswith("\\") and number + 1 < len(lines):
                number += 1
                line = line[:-1] + " " + lines[number]
            yield first + start, line
            number += 1
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for match in INLINE.finditer(prose):
        # a `|` inside a Markdown table cell is written `\|`
        yield prose.count("\n", 0, match.start()) + 1, match.group(1).replace("\\|", "|")


def seqexp_invocations(line: str) -> Iterator[list[str]]:
    """The arguments of every `seqexp` command of one shell line."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # not shell (an unbalanced quote in prose)
        return
    segment: list[str] = []
    for token in [*tokens, ";"]:
        if token not in OPERATORS:
            segment.append(token)
            continue
        while segment and ENV_ASSIGNMENT.match(segment[0]):
            segment.pop(0)
        if segment and segment[0] == "seqexp":
            yield segment[1:]
        segment = []


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        for number, line in shell_lines(page.read_text()):
            for args in seqexp_invocations(line):
                found.append((f"{page_name(page)}:{number}", args))
    return found


def declared_files(page: Path) -> dict[str, str]:
    """Files a page shows in full: fenced blocks whose info string names a path."""
    return {info.split()[1]: body for info, body, _ in fenced_blocks(page.read_text())
            if len(info.split()) == 2 and "/" in info.split()[1]}


def all_declared_files() -> dict[str, str]:
    files: dict[str, str] = {}
    for page in PAGES:
        files |= declared_files(page)
    return files


COMMANDS = documented_commands()


def split_cli(args: list[str]) -> tuple[bool, list[str]]:
    """(multirun?, overrides) of a seqexp command line; flags the CLI does not take fail."""
    multirun, overrides = False, []
    tokens = iter(args)
    for token in tokens:
        if token in ("-m", "--multirun"):
            multirun = True
        elif token in ("--cfg", "-c", "--package", "-p"):
            assert next(tokens, None) is not None, f"{token} needs a value"
        elif token == "--resolve":
            continue
        elif token.startswith("-"):
            raise AssertionError(f"unexpected flag {token!r}")
        else:
            overrides.append(token)
    return multirun, overrides


def sweep_values(override: Override) -> list[str]:
    """The `key=value` settings one override stands for in a sweep."""
    if not override.is_sweep_override():
        return [override.input_line]
    key = override.get_key_element()
    sweep = override.value()
    if isinstance(sweep, (ChoiceSweep, RangeSweep)):
        values = list(override.sweep_string_iterator())
    elif isinstance(sweep, IntervalSweep):  # Optuna: both ends are valid values
        values = [str(sweep.start), str(sweep.end)]
    else:
        raise AssertionError(f"cannot expand {override.input_line!r}")
    return [f"{key}={value}" for value in values]


class Composer:
    """Hydra's compose over a copy of conf/ with the files the docs declare.

    Hydra composes the defaults list from the group overrides (`model=gru`, `hydra/launcher=x`)
    and then applies the key overrides to the result (ConfigLoaderImpl._apply_overrides_to_config).
    Doing the same here, with the composition of each set of group overrides cached, gives the
    same config and the same errors at a fraction of the cost of one compose per command.
    """

    def __init__(self, conf: Path) -> None:
        self.conf = conf
        self.groups = {p.name for p in conf.iterdir() if p.is_dir()}
        self.parser = OverridesParser.create()
        self.cache: dict[tuple[str, ...], DictConfig | Exception] = {}

    def is_group(self, override: Override) -> bool:
        key = override.key_or_group
        return "/" in key or key in self.groups or override.package is not None

    def __call__(self, overrides: list[str]) -> DictConfig:
        parsed = self.parser.parse_overrides(overrides)
        # Hydra applies group overrides by group, whatever their order: one cache entry.
        groups = tuple(sorted(o.input_line for o in parsed if self.is_group(o)))
        if groups not in self.cache:
            try:
                self.cache[groups] = self.compose(list(groups))
            except Exception as exc:  # re-raised for every command that needs it
                self.cache[groups] = exc
        composed = self.cache[groups]
        if isinstance(composed, Exception):
            raise composed
        if any(o.is_sweep_override() for o in parsed):  # Hydra's message for a RUN compose
            return self.compose(overrides)
        cfg = copy.deepcopy(composed)
        ConfigLoaderImpl._apply_overrides_to_config(
            [o for o in parsed if not self.is_group(o)], cfg)
        return cfg

    def compose(self, overrides: list[str]) -> DictConfig:
        with initialize_config_dir(config_dir=str(self.conf), version_base="1.3"):
            return compose(config_name="config", overrides=overrides, return_hydra_config=True)

    def jobs(self, multirun: bool, overrides: list[str]) -> list[list[str]]:
        """The override lists of the jobs a command runs: every value of every key the command
        line sweeps at least once (a plain run, sweep syntax included, is one job)."""
        if not multirun:
            return [overrides]
        values = [sweep_values(o) for o in self.parser.parse_overrides(overrides)]
        width = max((len(v) for v in values), default=1)
        return [[v[job % len(v)] for v in values] for job in range(width)]


@pytest.fixture(scope="module")
def docs_conf(tmp_path_factory) -> Path:
    """A copy of conf/ with the config files the docs declare under conf/."""
    conf = tmp_path_factory.mktemp("docs") / "conf"
    shutil.copytree(config_dir(), conf)
    for path, body in all_declared_files().items():
        if path.startswith("conf/"):
            target = conf / path.removeprefix("conf/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(body)
    return conf


@pytest.fixture(scope="module")
def example_package(tmp_path_factory) -> Iterator[Path]:
    """docs/adding-a-model.md's package (my-models/), installed as its page says: its project
    folder on sys.path with the entry points of its pyproject.toml."""
    files = declared_files(ROOT / "docs" / "adding-a-model.md")
    project = tmp_path_factory.mktemp("example") / EXAMPLE_PROJECT
    points = tomllib.loads(files[f"{EXAMPLE_PROJECT}/pyproject.toml"])["project"][
        "entry-points"]["seqexp.models"]
    package = next(iter(points.values())).split(".")[0]
    inside = {path.removeprefix(f"{EXAMPLE_PROJECT}/{package}/"): body
              for path, body in files.items() if path.startswith(f"{EXAMPLE_PROJECT}/{package}/")}
    tests = {path: body for path, body in files.items()
             if path.startswith(f"{EXAMPLE_PROJECT}/tests/")}
    for path, body in tests.items():
        (project.parent / path).parent.mkdir(parents=True, exist_ok=True)
        (project.parent / path).write_text(body)
    with pytest.MonkeyPatch.context() as monkeypatch:
        install_package(project, package, inside, points, monkeypatch)
        yield project
    registry.cache_clear()


@pytest.fixture(scope="module")
def composer(docs_conf) -> Composer:
    return Composer(docs_conf)


@pytest.fixture
def seqexp_main(docs_conf, example_package, monkeypatch, capsys):
    """`seqexp ARGS` through the installed entry point, seqexp.apps.cli.main (its checks of the
    command line, then Hydra's main), over the docs' copy of conf/; returns what it printed.
    A non-zero exit fails the calling test with the command's one-line error."""
    for module in (seqexp.apps.cli, seqexp.apps.preflight, seqexp.core.resources):
        monkeypatch.setattr(module, "config_dir", lambda: docs_conf)
    monkeypatch.setattr(seqexp.apps.cli, "_run", hydra.main(
        version_base="1.3", config_path=str(docs_conf), config_name="config")(
        seqexp.apps.cli._run.__wrapped__))

    def run(args: list[str]) -> str:
        monkeypatch.setattr(sys, "argv", ["seqexp", *args])
        capsys.readouterr()
        try:
            seqexp.apps.cli.main()
        except SystemExit as exc:
            if exc.code not in (0, None):
                err = capsys.readouterr().err.strip().splitlines() or [f"exit {exc.code}"]
                raise CommandFailed(err[-1]) from None
        finally:
            GlobalHydra.instance().clear()
        return capsys.readouterr().out

    return run


class CommandFailed(Exception):
    """A documented command exited non-zero; the message is its last line of stderr."""


# seqexp's one-line message for a preset whose plugin comes with an extra (cli.check_plugins)
OPTIONAL_EXTRA = re.compile(r"needs [\w-]+: pip install 'seqexp\[(\w+)\]'$")
DEV_EXTRAS = {extra for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())
              ["project"]["optional-dependencies"]["dev"]
              for group in re.findall(r"^seqexp\[([\w,]+)\]", requirement)
              for extra in group.split(",")}


def test_the_docs_show_commands():
    where = {w.split(":")[0] for w, _ in COMMANDS}
    assert {"README.md", "docs/configuration.md", "docs/tracking.md"} <= where
    assert any("-m" in args for _, args in COMMANDS)


def with_cfg_job(args: list[str]) -> list[str]:
    """A command as `seqexp` runs it up to the point of work: the composed job config printed
    (`--cfg job`) instead of a run. Informational flags (--help, --info) run as they are."""
    if any(a in ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i") for a in args):
        return args
    return [*args, "--cfg", "job"]


@pytest.mark.parametrize(("where", "args"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_runs_through_the_entry_point(composer, seqexp_main, where, args):
    """Each command goes through seqexp's main: the checks of the command line (unknown keys
    and group options, missing plugins; for a sweep, every job's keys), then Hydra's own
    composition and `--cfg job`. A sweep (-m) is checked whole, then each of its jobs is run
    with `--cfg job` (Hydra shows no config of a multirun)."""
    command = "seqexp " + " ".join(args)
    try:
        multirun, overrides = split_cli(args)
        if multirun:
            # keys and plugins; not the data, which the real datasets' pages cannot have here
            problem = seqexp.apps.preflight.check_command_line(args, check_data=False)
            if problem:
                raise CommandFailed(problem)
            jobs = [with_cfg_job(job) for job in composer.jobs(multirun, overrides)]
        else:
            jobs = [with_cfg_job(args)]
        for job in jobs:
            assert seqexp_main(job).strip(), f"`seqexp {' '.join(job)}` printed nothing"
    except CommandFailed as exc:
        extra = OPTIONAL_EXTRA.search(str(exc))
        if extra and extra.group(1) not in DEV_EXTRAS:  # the page says to install it first
            pytest.skip(f"{where}: needs seqexp[{extra.group(1)}], which the dev extra lacks")
        pytest.fail(f"{where}: `{command}` fails: {exc}", pytrace=False)
    except Exception as exc:  # one readable line per broken command
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        pytest.fail(f"{where}: `{command}` fails: {lines[-1]}", pytrace=False)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def group_keys() -> dict[str, set[str]]:
    """Every key each group's files (and the model files' shared Table 1 file) define."""
    keys: dict[str, set[str]] = {}
    for path in config_dir().rglob("*.yaml"):
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        group = path.relative_to(config_dir()).parts[0]
        if path.read_text().lstrip().startswith("# @package _global_"):
            sections = {g: v for g, v in cfg.items() if isinstance(v, dict)}
        else:
            sections = {group: cfg}
        for section, values in sections.items():
            keys.setdefault(section, set()).update(values)
    return keys


def inline_code(page: Path) -> Iterator[str]:
    prose = FENCE.sub("", page.read_text())
    for match in INLINE.finditer(prose):
        yield match.group(1)


def test_named_paths_and_keys_exist():
    keys = group_keys()
    declared = set(all_declared_files())
    problems = []
    for page in PAGES:
        for code in inline_code(page):
            key = CONFIG_KEY.match(code)
            if key and code not in NOT_KEYS and key.group(2) not in keys.get(key.group(1), set()):
                problems.append(f"{page_name(page)}: `{code}` names no config key")
            path = code.split(" ")[0].rstrip(".,")
            if REPO_PATH.match(path) and "*" not in path and path not in declared \
                    and not (ROOT / path).exists():
                problems.append(f"{page_name(page)}: `{code}` names no file")
        for target in re.findall(r"\]\(([^)#:]+\.(?:md|png))(?:#[^)]*)?\)", page.read_text()):
            resolved = (page.parent / target).resolve()
            name = str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else target
            if not resolved.exists() and name not in PAGES_FROM_OTHER_BRANCHES:
                problems.append(f"{page_name(page)}: link to {target} goes nowhere")
    assert not problems, "\n".join(problems)


def test_the_worked_example_passes_its_own_tests_and_runs_through_seqexp(example_package,
                                                                        tmp_path):
    """docs/adding-a-model.md as written: the package it shows, installed as it says, passes
    its own test and trains through the real `seqexp`, whose MLflow record is read back (the
    conformance suite runs over it in tests/test_conformance.py)."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "-n", "0", str(example_package / "tests")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-3000:]
    db = tmp_path / "mlflow.db"
    code, output = run_seqexp(["model=recent_items", "model.window=5",
                               *tiny_overrides(tmp_path / "data", db)])
    assert code == 0, output[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("seqexp").experiment_id])
    assert run.data.tags["model"] == "recent_items" and run.data.params["model.window"] == "5"
    assert run.info.status == "FINISHED"
    assert 0 < flat_metrics(run.data.metrics)["test_mrr_at_20"] <= 1
    conformance.check_all("recent_items", tmp_path / "data", tmp_path / "conformance")


def tracked_text_lines() -> Iterator[tuple[str, int, str]]:
    """(path, line number, line) of every tracked source, doc, config and script file."""
    tracked = [ROOT / p for p in subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split() if p.endswith((".py", ".md", ".yaml", ".toml", ".sh"))]
    for path in tracked:
        if path.is_file() and path.name != "test_docs.py":
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                yield str(path.relative_to(ROOT)), number, line


def test_the_repository_explains_itself_without_an_outside_spec():
    """Equations and the protocol live in docs/ (models.md, evaluation.md): no file of the
    repository points to a SPEC document it does not hold."""
    pointing = [f"{path}:{number}" for path, number, line in tracked_text_lines()
                if re.search(r"\bSPEC\b", line)]
    assert pointing == []


def _names_something(dotted: str) -> bool:
    """`seqexp.a.b.c` is a module, or an attribute (chain) of the longest importable prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        return all((found := getattr(found, name, None)) is not None for name in parts[cut:])
    return False


def test_code_comments_and_docs_name_only_modules_that_exist():
    """A dotted `seqexp.…` name in any tracked file is a module, class or function that exists
    (file names such as seqexp.csv and MLflow tag keys such as seqexp.role aside)."""
    tag_keys = {value for value in vars(tags).values() if isinstance(value, str)}
    stale = [f"{path}:{number}: {name}" for path, number, line in tracked_text_lines()
             for match in re.finditer(r"(?<![\w/.-])seqexp(?:\.[A-Za-z_]\w*)+(?![/\w-])", line)
             if (name := match.group(0)) not in tag_keys
             and not name.endswith((".csv", ".md", ".png", ".tex", ".yaml"))
             and not _names_something(name)]
    assert stale == []
