"""The service never imports torch, directly or through model_export (DESIGN.md: runtime deps)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import service

ROOT = Path(__file__).resolve().parents[1]


def test_no_service_module_pulls_in_torch() -> None:
    modules = sorted(m.name for m in pkgutil.iter_modules(service.__path__, "service."))
    assert "service.app" in modules and "service.history_loader" in modules
    # history_loader imports the shared log reader lazily; import it too.
    code = (
        "import importlib, sys\n"
        f"for name in {modules + ['model_export.data', 'model_export.vocab']!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]"
