"""Architecture rules from DESIGN.md that a refactor must not break."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_imports_no_prefect_outside_cli():
    offenders = [
        str(p.relative_to(REPO)) for p in (REPO / "varlide").rglob("*.py")
        if p.name != "cli.py" and {"prefect", "prefect_dask"} & _imports(p)
    ]
    assert offenders == [], f"varlide/ must not import Prefect outside cli.py: {offenders}"


def test_library_does_not_import_flows_or_tasks_except_cli():
    offenders = [
        str(p.relative_to(REPO)) for p in (REPO / "varlide").rglob("*.py")
        if p.name != "cli.py" and {"flows", "tasks"} & _imports(p)
    ]
    assert offenders == [], f"deps point down only (cli->flows->tasks->varlide): {offenders}"


def test_tasks_do_not_import_flows():
    offenders = [str(p) for p in (REPO / "tasks").rglob("*.py") if "flows" in _imports(p)]
    assert offenders == []


def test_models_never_read_files():
    bad = []
    for p in (REPO / "varlide" / "models").rglob("*.py"):
        imports = _imports(p)
        if {"fsspec", "s3fs", "PIL"} & imports:
            bad.append(str(p))
    assert bad == [], f"models are pure torch modules: {bad}"


def test_every_torch_load_is_weights_only():
    bad = []
    for p in list((REPO / "varlide").rglob("*.py")) + list((REPO / "benchmarks").rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and getattr(node.func.value, "id", "") == "torch"):
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant)
                        and kw["weights_only"].value is True):
                    bad.append(f"{p}:{node.lineno}")
    assert bad == []
