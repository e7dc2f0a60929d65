"""Every AnnData key the package uses comes from ``scbranch._keys.Key``, never a literal."""

import ast
from pathlib import Path

import scbranch as sb
from scbranch._keys import Key

PACKAGE = Path(sb.__file__).parent
#: trajectory columns and phases: written in one place, read back everywhere else
TRAJECTORY_NAMES = {
    v for k, v in vars(Key.obs).items() if k.isupper() and not str(v).startswith("scbranch")
}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string nodes that are docstrings (module, class, function)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def _offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if node.value.startswith("scbranch_"):
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            key = node.slice.value
            on_obs = isinstance(node.value, ast.Attribute) and node.value.attr == "obs"
            if key == "scbranch" or (on_obs and key in TRAJECTORY_NAMES):
                found.append(f"{path.name}:{node.lineno}: [{key!r}]")
    return found


def test_no_anndata_key_literals_outside_the_key_class():
    offences = [
        o
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "_keys.py"
        for o in _offences(path)
    ]
    assert not offences, "use scbranch._keys.Key instead of literals:\n" + "\n".join(offences)


def test_the_check_finds_a_literal(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        'def f(a):\n    """Doc with scbranch_hierarchy."""\n    return a.uns["scbranch_x"]\n'
    )
    assert _offences(bad) == ["bad.py:3: 'scbranch_x'"]
    also = tmp_path / "also.py"
    also.write_text('def f(a):\n    return a.obs["phase"], a.uns["scbranch"]\n')
    assert len(_offences(also)) == 2


def test_keys_are_unique_where_they_share_a_namespace():
    for ns in (Key.uns, Key.obs, Key.obsm, Key.layers):
        values = [v for k, v in vars(ns).items() if k.isupper()]
        assert len(values) == len(set(values)), ns
