"""The notebooks in notebooks/: stored without outputs, and each one runs top to bottom on a real ComfyUI.

The live tests execute every notebook in a fresh kernel (nbclient) in a copy of notebooks/. The
first starts its own local ComfyUI, as a user without ``COMFYUI_URL`` would; the others share one
server through ``COMFYUI_URL``. A cell appended to each copy checks that the notebook stopped what
it started; a failing cell fails the test with that cell's traceback.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.conftest import REPO
from tests.live_fixtures import comfy_dir_or_skip

NOTEBOOKS_DIR = REPO / "notebooks"
EXPECTED = ["01_model_comparison.ipynb", "02_quality_gated.ipynb", "03_chaining.ipynb", "04_service.ipynb"]
CELL_TIMEOUT = 240  # seconds per cell: starting ComfyUI on a loaded 2-core machine is the slowest
# Jupyter's own paths, without its deprecation warning (pytest turns warnings into errors).
os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")


def _read(path: Path) -> Any:
    nbformat = pytest.importorskip("nbformat")
    return nbformat.read(path, as_version=4)


# -- what is stored ---------------------------------------------------------------------------------


def test_the_four_notebooks_are_there() -> None:
    assert sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb")) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_a_stored_notebook_has_no_outputs(name: str) -> None:
    nbformat = pytest.importorskip("nbformat")
    nb = _read(NOTEBOOKS_DIR / name)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata.kernelspec.name == "python3"
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name} cell {index} has outputs: strip them before committing"
            assert cell.execution_count is None, f"{name} cell {index} has an execution count"


def test_the_kernel_runs_this_python() -> None:
    """nbclient starts kernel ``python3``; its command must resolve to this venv's interpreter."""
    pytest.importorskip("ipykernel")
    from jupyter_client.manager import KernelManager

    manager = KernelManager(kernel_name="python3")
    assert manager.format_kernel_cmd()[0] == sys.executable


def test_the_tiny_unet_names_match_the_files_written() -> None:
    from comfy_orchestrator.notebook import tiny_unet_names

    tiny_models = pytest.importorskip("comfy_orchestrator.testing.tiny_models")
    assert tiny_unet_names(0) == [tiny_models.UNET_FILE]


# -- the helpers they share ------------------------------------------------------------------------


def test_comfyui_url_may_name_several_servers() -> None:
    from comfy_orchestrator.notebook import NotebookBackends, urls_from_env

    env = {"COMFYUI_URL": "http://gpu-a:8188/, http://gpu-b:8188"}
    assert urls_from_env(env) == ["http://gpu-a:8188", "http://gpu-b:8188"]
    assert urls_from_env({}) == []
    backends = NotebookBackends("unused", urls=urls_from_env(env))
    assert not backends.is_local
    assert [(c.name, c.url) for c in backends.configs()] == [("comfy-1", "http://gpu-a:8188"),
                                                             ("comfy-2", "http://gpu-b:8188")]


async def test_a_comfyui_url_that_does_not_answer_is_named(unused_port: int) -> None:
    from comfy_orchestrator.errors import ComfyOrchestratorError
    from comfy_orchestrator.notebook import NotebookBackends

    url = f"http://127.0.0.1:{unused_port}"
    with pytest.raises(ComfyOrchestratorError, match=f"COMFYUI_URL names {url}, which does not answer"):
        await NotebookBackends("unused", urls=[url]).start()


def test_the_service_settings_written_are_valid(tmp_path: Path) -> None:
    import tomllib

    from comfy_orchestrator.notebook import ServiceProcess
    from comfy_orchestrator.service import ServiceSettings

    process = ServiceProcess({"gpu \"a\"": "http://127.0.0.1:8188"}, tmp_path / "svc", port=8123)
    settings = ServiceSettings.from_mapping(tomllib.loads(process.settings_toml()))
    assert settings.server.port == 8123
    assert [(b.name, b.url) for b in settings.backends] == [('gpu "a"', "http://127.0.0.1:8188")]
    assert settings.tenant_of() == {process.token: "notebook"}
    assert settings.store.path == tmp_path.resolve() / "svc" / "jobs.db"


# -- running them -----------------------------------------------------------------------------------


@pytest.fixture
def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: nothing listens there


def _workspace(tmp_path: Path) -> Path:
    work = tmp_path / "notebooks"
    work.mkdir()
    return work


async def _execute(name: str, work: Path, check: str) -> Any:
    """Run a copy of notebook ``name`` in ``work`` with ``check`` appended as a last cell."""
    pytest.importorskip("nbclient")
    from nbclient import NotebookClient
    from nbformat.v4 import new_code_cell

    nb = _read(NOTEBOOKS_DIR / name)
    nb.cells.append(new_code_cell(f"import sys\nassert sys.executable == {sys.executable!r}, sys.executable\n{check}"))
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(work)}})
    await client.async_execute()
    return nb


def _outputs(nb: Any, kind: str) -> list[Any]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
            if out.output_type in ("display_data", "execute_result") and kind in out.get("data", {})]


def _comfy_tree_or_skip() -> None:
    pytest.importorskip("torch", reason="the tiny models need torch")
    comfy_dir_or_skip("the notebooks")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def shared_comfy(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """One local ComfyUI with the notebooks' tiny models, for every notebook that reads COMFYUI_URL."""
    _comfy_tree_or_skip()
    from comfy_orchestrator.notebook import NotebookBackends

    async with NotebookBackends(tmp_path_factory.mktemp("notebook-comfy"), urls=()) as comfy:
        yield comfy.urls[0]


@pytest.mark.comfy_live
@pytest.mark.timeout(600)
async def test_the_comparison_notebook_starts_and_stops_its_own_comfyui(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _comfy_tree_or_skip()
    monkeypatch.delenv("COMFYUI_URL", raising=False)
    work = _workspace(tmp_path)
    nb = await _execute(EXPECTED[0], work, "assert comfy.is_local and comfy.local.returncode is not None, comfy")

    assert len(_outputs(nb, "image/png")) >= 2  # the contact sheet and the timing plot
    run_dir = work / "work" / "01_model_comparison"
    assert (run_dir / "contact_sheet.png").is_file()
    cells = json.loads((run_dir / "run" / "manifest.json").read_text())["cells"]
    assert len(cells) == 9
    assert all(cell["status"] == "done" and cell["score"] is not None for cell in cells.values())


CHECKS = {
    # Each used the server of COMFYUI_URL (and started none); the service one also stopped the service.
    "02_quality_gated.ipynb": "assert comfy.local is None and not comfy.is_local",
    "03_chaining.ipynb": "assert comfy.local is None and result.ok",
    "04_service.ipynb": "assert comfy.local is None and not service.running and service.returncode == 0",
}
IMAGES = {"02_quality_gated.ipynb": 2, "03_chaining.ipynb": 2, "04_service.ipynb": 1}


@pytest.mark.comfy_live
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", EXPECTED[1:])
async def test_a_notebook_runs_on_the_comfyui_of_comfyui_url(
    name: str, shared_comfy: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMFYUI_URL", shared_comfy)
    nb = await _execute(name, _workspace(tmp_path), CHECKS[name])
    assert len(_outputs(nb, "image/png")) >= IMAGES[name]
