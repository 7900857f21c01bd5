"""The online half stands alone: the service imports neither torch nor the offline package.

DESIGN.md: the service's runtime dependencies exclude torch, and the two halves share only the
bundle contract (service/bundle.py) and the Redis keys; the service's container image ships no
model_export/. Checked three ways: statically (no import of model_export anywhere in service/),
dynamically (importing every service module loads no torch), and for real (a copy of the tree
without model_export/ serves a bundle over HTTP).
"""

from __future__ import annotations

import ast
import os
import pkgutil
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from service_helpers import ServiceProcess

import service

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = "model_export"


def test_no_service_module_imports_the_offline_package() -> None:
    for path in sorted((ROOT / "service").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == OFFLINE for n in names), (
                f"service/{path.name}:{node.lineno} imports {names}"
            )


def test_no_service_module_pulls_in_torch() -> None:
    modules = sorted(m.name for m in pkgutil.iter_modules(service.__path__, "service."))
    assert "service.app" in modules and "service.bundle" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'model_export')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_a_tree_without_the_offline_package_serves_a_bundle(
    tiny_bundle: Path, redis_url: str, tmp_path: Path
) -> None:
    # What the service image holds: service/ and the CLI, no model_export/. `python -S` skips
    # site's .pth files, so the editable install cannot reach back into this checkout; the
    # installed third-party packages come in through PYTHONPATH alone.
    tree = tmp_path / "runtime"
    for package in ("service", "dinserve"):
        shutil.copytree(ROOT / package, tree / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    paths = sysconfig.get_paths()
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(dict.fromkeys([paths["purelib"], paths["platlib"]]))}
    probe = subprocess.run([sys.executable, "-S", "-c", f"import {OFFLINE}"], cwd=tree, env=env,
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr  # truly absent

    process = ServiceProcess(tiny_bundle, redis_url, tmp_path / "service.log",
                             warmup_runs="0", reload_poll_seconds="0")
    process.cwd = tree
    process.env["PYTHONPATH"] = env["PYTHONPATH"]
    process.argv.insert(1, "-S")
    with process:
        ready = process.http.get("/readyz")
        assert ready.status_code == 200, ready.text
        items = list(process.http.get("/model").json()["vocabularies"].keys())
        assert items == ["items", "categories"]
        answer = process.http.post(
            "/score", json={"user_id": "nobody", "candidates": [{"item_id": "1"}, {"item_id": "2"}]}
        )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert len(body["scores"]) == 2 and all(0.0 < s < 1.0 for s in body["scores"])
    assert "model_export" not in process.log()
