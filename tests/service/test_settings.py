"""The settings file: TOML in, a frozen model out, errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from comfy_orchestrator.service import ServiceSettings, SettingsError

GOOD = """
[server]
host = "0.0.0.0"
port = 9000

[store]
path = "var/jobs.db"
outputs_dir = "var/outputs"

[[backends]]
name = "4090"
url = "http://gpu-a:8188"
max_in_flight = 2
headers = { Authorization = "Bearer backend-secret" }

[[tokens]]
token = "a-long-enough-token-1"
tenant = "acme"

[limits]
max_queued_per_tenant = 10
"""


def test_a_full_file_loads_with_defaults_for_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "service.toml"
    path.write_text(GOOD)
    settings = ServiceSettings.load(path)
    assert settings.server.port == 9000
    assert settings.server.host == "0.0.0.0"
    assert settings.limits.max_queued_per_tenant == 10
    assert settings.limits.max_body_bytes == 10 * 1024 * 1024
    assert settings.limits.max_nodes == 500
    assert settings.limits.max_pixels == 4096 * 4096
    [backend] = settings.backends
    assert backend.config().max_in_flight == 2
    assert backend.config().headers["Authorization"].startswith("Bearer")
    assert settings.tenant_of() == {"a-long-enough-token-1": "acme"}
    assert "a-long-enough-token-1" not in repr(settings)
    with pytest.raises(ValidationError):
        settings.server.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[server]\nport = 70000\n", "server.port"),
        ("[limits]\nmax_nodes = 0\n", "limits.max_nodes"),
        ("[[backends]]\nname = \"a\"\nurl = \"ftp://x\"\n", "backends.0.url"),
        ("[[tokens]]\ntoken = \"short\"\ntenant = \"a\"\n", "tokens.0.token"),
        ("[limits]\nmax_node = 3\n", "limits.max_node"),
        ("[[backends]]\nname = \"a\"\nurl = \"http://x\"\n[[backends]]\nname = \"a\"\nurl = \"http://y\"\n",
         "backends"),
    ],
)
def test_errors_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "service.toml"
    path.write_text(text)
    with pytest.raises(SettingsError, match=rf"{path!s}: {field}") as caught:
        ServiceSettings.load(path)
    if field == "tokens.0.token":
        assert "'short'" not in str(caught.value)  # a token's value never appears in an error


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read"):
        ServiceSettings.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        ServiceSettings.load(bad)
