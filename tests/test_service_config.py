"""service/config.py: environment, flags, secrets, and the settings table in docs/settings.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from dinserve.commands import ServeOptions
from service.__main__ import settings_from_options
from service.config import Settings, redact_url

DOCS = Path(__file__).resolve().parents[1] / "docs" / "settings.md"


def documented_rows() -> dict[str, str]:
    """`CTR_X` -> its default cell, from every table row of docs/settings.md."""
    rows = {}
    for line in DOCS.read_text().splitlines():
        match = re.match(r"\| `(CTR_[A-Z_]+)` \| ([^|]+) \|", line)
        if match:
            rows[match.group(1)] = match.group(2).strip()
    return rows


def test_every_setting_is_documented_with_its_default() -> None:
    rows = documented_rows()
    fields = {f"CTR_{name.upper()}": field for name, field in Settings.model_fields.items()}
    assert set(rows) == set(fields), "docs/settings.md and Settings disagree"
    for env, field in fields.items():
        default = field.default
        if default is None:
            assert rows[env] == "unset", env
        else:
            shown = default.get_secret_value() if isinstance(default, SecretStr) else default
            text = str(shown).lower() if isinstance(shown, bool) else str(shown)
            assert rows[env] == f"`{text}`", (env, rows[env], text)


def test_environment_uses_the_ctr_prefix_and_init_values_win(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CTR_MAX_CANDIDATES", "7")
    monkeypatch.setenv("CTR_REDIS_POLICY", "fail")
    monkeypatch.setenv("CTR_PORT", "9000")
    settings = Settings()
    assert settings.max_candidates == 7 and settings.redis_policy == "fail"
    from_flags = settings_from_options(ServeOptions(model_dir=Path("elsewhere"), port=8123))
    assert from_flags.port == 8123 and from_flags.model_dir == Path("elsewhere")
    assert from_flags.max_candidates == 7  # untouched by flags: still the environment's


def test_invalid_values_are_refused_without_echoing_secrets() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(redis_url="http://user:hunter2@host:1/0")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ValidationError):
        Settings(redis_policy="sometimes")
    with pytest.raises(ValidationError):
        Settings(max_candidates=0)
    with pytest.raises(ValidationError):
        Settings(unknown_setting=1)  # type: ignore[call-arg]  # refused: the point of the test


def test_secrets_stay_out_of_repr_and_locations() -> None:
    settings = Settings(redis_url="rediss://app:hunter2@cache.internal:6380/2", admin_token="tok3n")
    assert "hunter2" not in repr(settings) and "tok3n" not in repr(settings)
    assert settings.redis_location == "rediss://cache.internal:6380/2"
    assert redact_url("redis://:pw@[::1]:6379/0") == "redis://[::1]:6379/0"
    assert redact_url("unix:///tmp/redis.sock") == "unix:///tmp/redis.sock"
