"""Security basics (SECURITY.md): admin off by default and token-checked in constant time, Redis
credentials used but never shown, TLS through a rediss:// URL, only ONNX/JSON/TSV loaded (no
pickle anywhere in the service), bundle file names cannot escape the bundle, non-root container.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from service_helpers import ROOT, ServiceProcess, item_ids

from dinserve.redis_server import LocalRedis
from service import routes
from service.app import create_app
from service.config import Settings, redact_url
from service.errors import BundleRejected
from service.history import open_client
from service.model import CTRModel

PASSWORD = "S3cr3t-pa55w0rd"
TOKEN = "adm1n-t0ken-value"
SERVICE = ROOT / "service"


# ----------------------------------------------------------------------------------------------
# Admin endpoint


@pytest.fixture(scope="module")
def app_settings(plain_bundle: Path, redis_url: str) -> dict[str, object]:
    return dict(model_dir=plain_bundle, redis_url=redis_url, redis_prefix="sec",
                reload_poll_seconds=0, warmup_runs=0)


def test_admin_endpoint_does_not_exist_without_a_token(app_settings: dict[str, object]) -> None:
    with TestClient(create_app(Settings(**app_settings))) as client:  # type: ignore[arg-type]
        for auth in (None, "Bearer ", "Bearer anything", f"Bearer {TOKEN}"):
            headers = {"authorization": auth} if auth else {}
            response = client.post("/admin/reload", headers=headers)
            assert response.status_code == 404
            assert "CTR_ADMIN_TOKEN" in response.json()["message"]


def test_admin_endpoint_needs_the_exact_bearer_token(app_settings: dict[str, object]) -> None:
    settings = Settings(**app_settings, admin_token=TOKEN)  # type: ignore[arg-type]
    with TestClient(create_app(settings)) as client:
        wrong = [None, "", "Bearer", "Bearer ", f"Basic {TOKEN}", f"Bearer {TOKEN[:-1]}",
                 f"Bearer {TOKEN}x", f"Bearer {TOKEN.upper()}", f"{TOKEN}",
                 b"Bearer \xe9\xff", f"Bearer  {TOKEN} extra"]
        for auth in wrong:
            headers = {"authorization": auth} if auth is not None else {}
            # bytes values on purpose: a header that is not text must be refused too
            response = client.post("/admin/reload", headers=headers)  # type: ignore[arg-type]
            assert response.status_code == 401, auth
            assert response.headers["www-authenticate"] == "Bearer"
            assert TOKEN not in response.text
        ok = client.post("/admin/reload", headers={"authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json()["result"] == "unchanged"
        for path in ("/model", "/metrics", "/readyz"):
            assert TOKEN not in client.get(path).text


def test_the_token_is_compared_in_constant_time() -> None:
    """hmac.compare_digest on every path, and no ordinary comparison of the secret anywhere."""
    source = inspect.getsource(routes.check_admin)
    assert "hmac.compare_digest(" in source
    tree = ast.parse(inspect.getsource(routes))
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, ast.Eq | ast.NotEq)
                                                 for op in node.ops):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            assert not names & {"expected", "presented"}, ast.unparse(node)
    # The secret's value is read in exactly one place in the service.
    readers = [path.name for path in SERVICE.glob("*.py")
               if "admin_token.get_secret_value()" in path.read_text()]
    assert readers == ["routes.py"]


def test_random_paths_and_ids_create_no_metric_series(app_settings: dict[str, object]) -> None:
    with TestClient(create_app(Settings(**app_settings))) as client:  # type: ignore[arg-type]
        before = client.get("/metrics").text.count("\n")
        for i in range(200):
            client.get(f"/probe-{i}/{'x' * (i % 50)}")
            client.post("/score", json={"user_id": f"user-{i}", "candidates": [{"item_id": i}]})
        text = client.get("/metrics").text
    assert "probe-" not in text and "user-" not in text
    # One new series per (route, status) pair and histogram bucket at most, not one per request.
    assert text.count("\n") - before < 150


# ----------------------------------------------------------------------------------------------
# Redis credentials and TLS


@pytest.fixture
def password_redis() -> Iterator[str]:
    """A redis-server of this test's own that requires PASSWORD; yields its port."""
    server = LocalRedis(password=PASSWORD)
    if server.binary is None:
        pytest.skip("no redis-server binary")
    try:
        yield str(server.start().port)
    finally:
        server.stop()


def test_redis_password_is_used_but_never_logged_or_shown(
    password_redis: str, plain_bundle: Path, tmp_path: Path,
) -> None:
    port = password_redis
    url = f"redis://default:{PASSWORD}@127.0.0.1:{port}/0"
    ids = item_ids(plain_bundle)
    with redis.Redis.from_url(url) as r:
        r.rpush("sec:hist:u", ids[1], ids[2])
    svc = ServiceProcess(plain_bundle, url, tmp_path / "service.log", reload_poll_seconds="0",
                         warmup_runs="0", redis_prefix="sec", log_level="debug",
                         admin_token=TOKEN)
    with svc:
        response = svc.http.post("/score", json={"user_id": "u",
                                                 "candidates": [{"item_id": ids[3]}]})
        assert response.status_code == 200, response.text
        assert response.json()["history_length"] == 2  # the password really authenticated
        shown = [svc.http.get(path).text for path in ("/model", "/metrics", "/readyz")]
        assert f"redis://127.0.0.1:{port}/0" in shown[0]  # the location, without credentials
        # Now lose Redis: the error paths must not leak the URL either.
        with redis.Redis.from_url(url) as r:
            r.config_set("requirepass", "changed-" + PASSWORD)
            r.execute_command("CLIENT", "KILL", "TYPE", "normal")
        degraded = svc.http.post("/score", json={"user_id": "u",
                                                 "candidates": [{"item_id": ids[3]}]})
        assert degraded.status_code == 200 and degraded.json()["degraded"] is True
        shown += [degraded.text, svc.http.get("/readyz").text, svc.http.get("/metrics").text]
    log = svc.log()
    assert "DEBUG" in log  # the most talkative level was on
    for text in [*shown, log]:
        assert PASSWORD not in text
        assert TOKEN not in text


def test_an_invalid_redis_url_is_refused_without_echoing_it(plain_bundle: Path) -> None:
    for url in (f"ftp://u:{PASSWORD}@host/0", f"http://:{PASSWORD}@h", f"{PASSWORD}"):
        done = subprocess.run([sys.executable, "-m", "service", "--model-dir", str(plain_bundle),
                               "--redis-url", url, "--port", "0"], capture_output=True,
                              text=True, cwd=ROOT, timeout=60)
        assert done.returncode == 2
        assert "redis_url" in done.stderr
        assert PASSWORD not in done.stderr + done.stdout


def test_tls_and_unix_sockets_come_through_the_url() -> None:
    tls = open_client(f"rediss://:{PASSWORD}@cache.internal:6380/0?ssl_cert_reqs=required",
                      deadline_seconds=0.05, max_connections=4)
    assert tls.connection_pool.connection_class is SSLConnection
    assert tls.connection_pool.connection_kwargs["password"] == PASSWORD
    unix = open_client("unix:///run/redis.sock?db=0", deadline_seconds=0.05, max_connections=4)
    assert unix.connection_pool.connection_class is UnixDomainSocketConnection
    assert redact_url(f"rediss://user:{PASSWORD}@cache.internal:6380/0") == (
        "rediss://cache.internal:6380/0")
    assert Settings(redis_url=f"rediss://:{PASSWORD}@h:6380/0").redis_location == (
        "rediss://h:6380/0")
    assert PASSWORD not in repr(Settings(redis_url=f"rediss://:{PASSWORD}@h:6380/0"))


# ----------------------------------------------------------------------------------------------
# What the service loads


FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal",
                     "torch", "cloudpickle", "yaml"}


def python_sources() -> list[Path]:
    return sorted(SERVICE.glob("*.py"))  # the service imports nothing of ours from elsewhere


@pytest.mark.parametrize("path", python_sources(), ids=lambda p: p.name)
def test_the_service_never_imports_a_deserializer_that_runs_code(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots = {(node.module or "").split(".")[0]}
        else:
            roots = set()
        line = getattr(node, "lineno", "?")
        assert not roots & FORBIDDEN_MODULES, f"{path.name}:{line}: {roots}"
        if isinstance(node, ast.Call):
            call = ast.unparse(node.func)
            # numpy's load/fromfile with allow_pickle, eval/exec: none of them belong here.
            assert call not in {"eval", "exec", "np.load", "numpy.load", "pickle.loads"}, (
                f"{path.name}:{node.lineno}: {call}")
    assert not re.search(r"allow_pickle\s*=\s*True", path.read_text())


def test_a_bundle_file_name_cannot_escape_the_bundle(
    plain_bundle: Path, tmp_path: Path, app_settings: dict[str, object],
) -> None:
    bundle = tmp_path / "m" / "1"
    shutil.copytree(plain_bundle, bundle)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the service")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["../../secret.txt"] = {"sha256": "0" * 64, "bytes": 19}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleRejected, match="not a plain file name"):
        CTRModel.load(bundle, Settings(**app_settings))  # type: ignore[arg-type]


def test_the_bundle_formats_loaded_are_onnx_json_and_tsv_only(plain_bundle: Path) -> None:
    suffixes = {p.suffix for p in plain_bundle.iterdir()}
    assert suffixes <= {".onnx", ".json", ".tsv"}, suffixes
    manifest = json.loads((plain_bundle / "manifest.json").read_text())
    assert {Path(name).suffix for name in manifest["files"]} <= {".onnx", ".json", ".tsv"}


# ----------------------------------------------------------------------------------------------
# The container


def test_the_service_image_runs_as_a_non_root_user() -> None:
    stages: dict[str, list[str]] = {}
    current = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words and words[0] == "FROM":
            current = words[-1] if "AS" in words or "as" in words else words[1]
            stages[current] = []
        elif words and words[0] == "USER":
            stages[current].append(words[1])
    last = list(stages)[-1]
    assert last == "service", "the default target (the last stage) must be the service"
    for stage in ("service", "model"):
        assert stages[stage], f"stage {stage} never sets USER"
        user = stages[stage][-1].split(":")[0]
        assert user not in ("0", "root"), (stage, user)
