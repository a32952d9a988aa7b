"""docker/: the compose file's structure, the config it mounts (valid for ``comfy-orch serve``) and
the Dockerfile's shape, checked by reading the files: no Docker engine is needed or used."""

from __future__ import annotations

import fnmatch
import json
import shlex
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from comfy_orchestrator.service import ServiceSettings

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
CONFIG = DOCKER / "orchestrator.toml"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"

BACKENDS = ("comfyui-0", "comfyui-1")
CONFIG_IN_CONTAINER = "/config/orchestrator.toml"


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def settings() -> ServiceSettings:
    return ServiceSettings.load(CONFIG)


def _mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """A service's volumes in long form (short ``src:dst[:ro]`` strings converted)."""
    out = []
    for item in service.get("volumes", []):
        if isinstance(item, str):
            parts = item.split(":")
            source, target = parts[0], parts[1]
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            out.append({"type": kind, "source": source, "target": target,
                        "read_only": len(parts) > 2 and "ro" in parts[2].split(",")})
        else:
            out.append(dict(item))
    return out


def _mount_covering(service: dict[str, Any], path: PurePosixPath) -> dict[str, Any] | None:
    """The deepest mount whose target contains ``path``."""
    best: dict[str, Any] | None = None
    for mount in _mounts(service):
        target = PurePosixPath(mount["target"])
        if (path == target or target in path.parents) and (
                best is None or len(target.parts) > len(PurePosixPath(best["target"]).parts)):
            best = mount
    return best


def _healthcheck_test(service: dict[str, Any]) -> list[str]:
    check = service.get("healthcheck")
    assert check, "no healthcheck"
    assert not check.get("disable", False)
    test = check["test"]
    if isinstance(test, str):
        return ["CMD-SHELL", test]
    return list(test)


def _instructions(path: Path) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def _stages(path: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in _instructions(path):
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
    return stages


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not exec form: {args}"
    return [str(v) for v in value]


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics, enough for this file: last match wins, ``!`` re-includes,
    a pattern matching a folder excludes what is under it."""
    parts = PurePosixPath(rel).parts
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            if fnmatch.fnmatchcase(prefix, pat) or (pat.startswith("**/") and (
                    fnmatch.fnmatchcase(prefix, pat[3:]) or fnmatch.fnmatchcase(prefix, pat))):
                ignored = not negate
                break
    return ignored


def _ignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


# ------------------------------------------------------------------------------------------ compose


def test_compose_has_the_orchestrator_and_two_comfyui_backends(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"orchestrator", *BACKENDS}


def test_backends_use_one_public_comfyui_image_and_are_not_built(compose: dict[str, Any]) -> None:
    images = set()
    for name in BACKENDS:
        service = compose["services"][name]
        assert "build" not in service, f"{name}: ComfyUI must come from a public image, not be built here"
        image = service["image"]
        assert "comfyui" in image.lower(), f"{name}: expected a ComfyUI image, got {image}"
        assert ":" in image, f"{name}: pin a tag, got {image}"
        assert not image.endswith(":latest")
        images.add(image)
    assert len(images) == 1


def test_each_backend_reserves_its_own_nvidia_gpu(compose: dict[str, Any]) -> None:
    seen: list[str] = []
    for name in BACKENDS:
        devices = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1
        device = devices[0]
        assert device["driver"] == "nvidia"
        assert "gpu" in device["capabilities"]
        assert "count" not in device, "count and device_ids are exclusive"
        assert len(device["device_ids"]) == 1
        seen.extend(str(d) for d in device["device_ids"])
    assert sorted(seen) == ["0", "1"], "the two backends must not share a GPU"


def test_the_orchestrator_itself_reserves_no_gpu(compose: dict[str, Any]) -> None:
    assert "deploy" not in compose["services"]["orchestrator"]


def test_every_service_has_a_health_check(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        test = _healthcheck_test(service)
        assert test[0] in {"CMD", "CMD-SHELL"}, name
        assert "curl" not in test, f"{name}: do not rely on curl in the image"
        assert "wget" not in test, f"{name}: do not rely on wget in the image"
    orch = " ".join(_healthcheck_test(compose["services"]["orchestrator"]))
    assert "127.0.0.1:8000/healthz" in orch
    for name in BACKENDS:
        check = " ".join(_healthcheck_test(compose["services"][name]))
        assert "127.0.0.1:8188/system_stats" in check, name


def test_the_orchestrator_waits_for_healthy_backends(compose: dict[str, Any]) -> None:
    depends = compose["services"]["orchestrator"]["depends_on"]
    assert isinstance(depends, dict), "use the long form, with conditions"
    assert set(depends) == set(BACKENDS)
    for name in BACKENDS:
        assert depends[name]["condition"] == "service_healthy"


def test_the_orchestrator_is_built_from_docker_dockerfile(compose: dict[str, Any]) -> None:
    orch = compose["services"]["orchestrator"]
    build = orch["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert any(str(p).split(":")[0] == "8000" or str(p).endswith(":8000") for p in orch["ports"])


def test_the_mounted_config_is_docker_orchestrator_toml_read_only(compose: dict[str, Any]) -> None:
    orch = compose["services"]["orchestrator"]
    mount = _mount_covering(orch, PurePosixPath(CONFIG_IN_CONTAINER))
    assert mount is not None
    assert mount["target"] == CONFIG_IN_CONTAINER
    assert mount["type"] == "bind"
    assert (COMPOSE.parent / mount["source"]).resolve() == CONFIG
    assert mount["read_only"] is True


def test_named_volumes_hold_the_store_and_outputs_the_config_names(
        compose: dict[str, Any], settings: ServiceSettings) -> None:
    orch = compose["services"]["orchestrator"]
    declared = set(compose["volumes"])
    for path in (settings.store.path, settings.store.outputs_dir):
        posix = PurePosixPath(path.as_posix())
        assert posix.is_absolute(), f"{path}: must be absolute in the container"
        mount = _mount_covering(orch, posix)
        assert mount is not None, f"{path} is not on a volume: it would be lost with the container"
        assert mount["type"] == "volume", mount
        assert mount["source"] in declared, mount
        assert mount.get("read_only", False) is False
    # The SQLite file lives *inside* its volume, not at the mount point itself.
    db_mount = _mount_covering(orch, PurePosixPath(settings.store.path.as_posix()))
    assert db_mount is not None
    assert db_mount["target"] != settings.store.path.as_posix()


def test_backends_keep_models_on_a_named_volume(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    for name in BACKENDS:
        mount = _mount_covering(compose["services"][name], PurePosixPath("/root/ComfyUI/models/checkpoints"))
        assert mount is not None
        assert mount["target"] == "/root/ComfyUI/models"
        assert mount["type"] == "volume"
        assert mount["source"] in declared


def test_every_named_volume_used_is_declared_and_every_declared_one_used(compose: dict[str, Any]) -> None:
    used = {m["source"] for s in compose["services"].values() for m in _mounts(s) if m["type"] == "volume"}
    assert used == set(compose["volumes"])


def test_the_stop_grace_period_covers_the_drain(compose: dict[str, Any], settings: ServiceSettings) -> None:
    grace = str(compose["services"]["orchestrator"]["stop_grace_period"])
    assert grace.endswith("s")
    assert grace[:-1].isdigit()
    assert int(grace[:-1]) > settings.server.drain_timeout


# ------------------------------------------------------------------------------------------ config


def test_the_mounted_config_is_valid_for_serve(settings: ServiceSettings) -> None:
    assert settings.server.host == "0.0.0.0"
    assert settings.server.port == 8000
    assert settings.tokens, "a service with no tokens refuses every request"
    assert all(len(t.token) >= 16 for t in settings.tokens)


def test_the_config_names_the_compose_backends(compose: dict[str, Any], settings: ServiceSettings) -> None:
    urls = {b.name: urlsplit(b.url) for b in settings.backends}
    assert set(urls) == set(BACKENDS)
    for name, url in urls.items():
        assert url.scheme == "http"
        assert url.hostname == name
        assert url.hostname in compose["services"]
        assert url.port == 8188
        exposed = {str(p).split(":")[-1] for p in compose["services"][name].get("expose", [])}
        assert "8188" in exposed


def test_the_token_is_an_obvious_placeholder(settings: ServiceSettings) -> None:
    tokens = [t.token for t in settings.tokens]
    assert all("CHANGE-ME" in t for t in tokens), "ship a placeholder, never a real-looking secret"
    assert "CHANGE-ME" in (DOCKER / "README.md").read_text(encoding="utf-8")


def test_serve_starts_from_the_mounted_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``comfy-orch serve --config docker/orchestrator.toml`` up to the point where it would listen."""
    from click.testing import CliRunner

    from comfy_orchestrator.cli import main, serve_command

    seen: dict[str, Any] = {}

    def fake_create_app(settings: ServiceSettings, *, role: object = None) -> object:
        seen["settings"] = settings
        seen["role"] = role
        return object()

    async def fake_serve(app: object, host: str, port: int, **child: object) -> None:
        seen.update(host=host, port=port, child=child)

    monkeypatch.setattr(serve_command, "create_app", fake_create_app)
    monkeypatch.setattr(serve_command, "_serve", fake_serve)
    result = CliRunner().invoke(main, ["serve", "--config", str(CONFIG)])
    assert result.exit_code == 0, result.output
    assert (seen["host"], seen["port"]) == ("0.0.0.0", 8000)
    assert seen["role"] is None  # one process: no supervisor, no sibling bus
    assert seen["child"] == {"listen_fd": None, "parent": None}
    assert [b.name for b in seen["settings"].backends] == list(BACKENDS)


# ------------------------------------------------------------------------------------------ Dockerfile


def test_the_dockerfile_is_multi_stage_on_python_311_slim() -> None:
    instructions = _instructions(DOCKERFILE)
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(froms) >= 2
    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    images = {f.split()[0].replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", "")) for f in froms}
    assert images == {"python:3.11-slim"}
    final_stage = _stages(DOCKERFILE)[-1]
    copies_from_builder = [a for k, a in final_stage if k == "COPY" and a.startswith("--from=")]
    assert copies_from_builder, "the runtime stage must copy the build's result from an earlier stage"


def test_the_final_stage_runs_as_a_non_root_user() -> None:
    final_stage = _stages(DOCKERFILE)[-1]
    users = [args for keyword, args in final_stage if keyword == "USER"]
    assert users, "no USER in the final stage: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user == "10001"
    assert any(k == "RUN" and "--uid 10001" in a for k, a in final_stage)


def test_the_dockerfile_exposes_and_health_checks_the_service(settings: ServiceSettings) -> None:
    final_stage = _stages(DOCKERFILE)[-1]
    assert ("EXPOSE", str(settings.server.port)) in final_stage
    checks = [args for keyword, args in final_stage if keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "CMD" in checks[0]
    assert f"127.0.0.1:{settings.server.port}/healthz" in checks[0]
    assert "curl" not in checks[0]


def test_the_entrypoint_serves_the_mounted_config() -> None:
    final_stage = _stages(DOCKERFILE)[-1]
    entrypoints = [args for keyword, args in final_stage if keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    assert _exec_form(entrypoints[0]) == ["comfy-orch", "serve", "--config", CONFIG_IN_CONTAINER]
    assert not [a for k, a in final_stage if k == "CMD"]


def test_the_image_installs_no_torch() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    for line in (a for k, a in _instructions(DOCKERFILE) if k == "RUN"):
        for word in shlex.split(line.replace("&&", " ")):
            assert "[quality" not in word, line
            assert not word.startswith("torch"), line
    assert "find_spec('torch') is not None" in text


def test_every_copied_source_exists_and_passes_the_dockerignore() -> None:
    patterns = _ignore_patterns()
    sources: list[str] = []
    for keyword, args in _instructions(DOCKERFILE):
        if keyword == "COPY" and not args.startswith("--from="):
            words = shlex.split(args)
            sources.extend(w for w in words[:-1] if not w.startswith("--"))
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert not _ignored(source, patterns), f"{source} is excluded from the build context"
    # Package modules survive, caches and local state do not.
    assert not _ignored("comfy_orchestrator/service/app.py", patterns)
    assert not _ignored("comfy_orchestrator/service/outputs.py", patterns)
    for junk in (".venv/bin/python", "tests/test_docker.py", "comfy_orchestrator/__pycache__/x.pyc",
                 ".pytest_cache/v", "out/a.png", "comfy_orchestrator.egg-info/PKG-INFO"):
        assert _ignored(junk, patterns), junk


def test_package_data_the_wheel_needs_is_in_the_context() -> None:
    patterns = _ignore_patterns()
    for path in [*(REPO / "quality").rglob("*.json"), REPO / "comfy_orchestrator" / "py.typed"]:
        rel = path.relative_to(REPO).as_posix()
        if "__pycache__" not in rel:
            assert not _ignored(rel, patterns), rel
