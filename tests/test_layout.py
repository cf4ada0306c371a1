"""The layout is the architecture: every import of the project's own modules points down the
layers below, so no folder reaches up into one that uses it and no two import each other.
Read from the source (every import statement, those inside functions and TYPE_CHECKING
blocks included), not from what happens to be imported at run time."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Top to bottom: a unit may import only units below it (and itself). A unit is a package's
# subfolder or a top-level module.
LAYERS = [
    "server.__main__",
    "server.cli",
    "server.api_servers",
    "server.serve",
    "server.app",
    "server.routes",
    "server.serving",
    "server.http",
    "server.protocol",
    "server.metrics",
    "server.settings",
    "server.chat_template",
    "tova_engine",  # the package's face: LLM, AsyncEngine, EngineConfig, ...
    "tova_engine.frontend",
    "tova_engine.core",
    "tova_engine.execution",
    "tova_engine.step",
    "tova_engine.attention",
    "tova_engine.config",
    "tova_engine.outputs",
    "tova_engine.sampling_params",
    "tova_engine.state",
    "tova_engine.loader",
    "tova_engine.model",
    "tova_engine.structured",
    "tova_engine.kernels",
    "tova_engine.parallel",
    "tova_engine.transfer",
    "tova_engine.validation",
    "tova_engine.errors",
]
RANK = {unit: rank for rank, unit in enumerate(LAYERS)}
# `server/__init__.py` names what the package offers (create_app, ServerSettings): a face.
FACES = {"server"}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.split(".")[0] in ("server", "tova_engine")]
    return found


SOURCES = sorted([*(REPO / "tova_engine").rglob("*.py"), *(REPO / "server").rglob("*.py")])


def test_every_unit_has_a_layer():
    units = {unit_of(module_name(path)) for path in SOURCES} - FACES
    assert units <= set(RANK), f"units without a layer: {sorted(units - set(RANK))}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_down(path: Path):
    source = unit_of(module_name(path))
    if source in FACES:
        return
    upward = [
        f"line {line}: {name}"
        for line, name in project_imports(path)
        if (target := unit_of(name)) != source
        and (target in FACES or RANK.get(target, -1) <= RANK[source])
    ]
    assert not upward, f"{source} imports units at or above its layer: {upward}"


def test_the_server_leaves_tensors_to_the_engine():
    direct = [
        str(path.relative_to(REPO))
        for path in REPO.joinpath("server").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(
            name.split(".")[0] == "torch"
            for name in ([node.module or ""] if isinstance(node, ast.ImportFrom)
                         else [alias.name for alias in node.names])
        )
    ]
    assert not direct, f"server modules importing torch: {direct}"


def test_the_core_sees_one_executor():
    """Ranks, collectives and plans are the executor's: the core imports only its interface."""
    reaching = [
        f"{path.relative_to(REPO)}: {name}"
        for path in sorted(REPO.joinpath("tova_engine", "core").glob("*.py"))
        for _, name in project_imports(path)
        if name.startswith(("tova_engine.parallel", "tova_engine.execution.ranks",
                            "tova_engine.execution.worker"))
    ]
    assert not reaching, f"the core reaches past the executor: {reaching}"
