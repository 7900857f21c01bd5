"""`dinserve openapi`: the HTTP API's OpenAPI document, exactly as the app generates it.

docs/openapi.json is this command's output, committed so that readers (and client generators) get
the API without running anything; tests/test_docs.py fails when the app's schema drifts from it
(`make openapi` regenerates it). The app is built without running its lifespan: no model and no
Redis are needed, and default settings are used whatever the environment says, so the output only
changes when the code does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from dinserve.commands import OpenapiOptions


def build_schema() -> dict[str, Any]:
    from service.app import create_app
    from service.config import Settings

    # model_construct(): the field defaults, without reading CTR_* from the environment.
    schema: dict[str, Any] = create_app(Settings.model_construct()).openapi()
    return schema


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def run(options: OpenapiOptions) -> int:
    text = render(build_schema())
    out = Path(options.out) if options.out != "-" else None
    if options.check:
        if out is None or not out.is_file() or out.read_text(encoding="utf-8") != text:
            print(f"{options.out} differs from the app's OpenAPI schema: run `make openapi`",
                  file=sys.stderr)
            return 1
        print(f"{options.out} matches the app's OpenAPI schema")
        return 0
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}")
    return 0
