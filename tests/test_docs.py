"""The documents stay true to the tree: every module is named in docs/development.md's layout
table, and the README stays a front door."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_module_is_in_the_layout_table():
    table = (ROOT / "docs" / "development.md").read_text()
    modules = sorted(p.relative_to(ROOT).as_posix() for package in ("contract", "service", "training")
                     for p in (ROOT / package).rglob("*.py"))
    missing = [m for m in modules if f"| `{m}` |" not in table]
    assert not missing, f"docs/development.md's layout table does not name {missing}"


def test_readme_is_short_and_links_to_pages_that_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "make run" in readme and "make test" in readme
    for page in ("training", "api", "operations", "performance", "development"):
        assert f"(docs/{page}.md)" in readme and (ROOT / "docs" / f"{page}.md").is_file()


def test_the_contract_imports_neither_half():
    """contract/ is what training and the service share: it may import neither (nor TensorFlow,
    nor FastAPI), so each half, and the tests, can use it alone."""
    import ast

    for path in sorted((ROOT / "contract").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        roots = {name.split(".")[0] for name in imported}
        assert not roots & {"service", "training", "tensorflow", "keras", "fastapi"}, (path.name, sorted(roots))
