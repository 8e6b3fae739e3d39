"""docs/inputs.md lists every check a user's input meets, in the words the errors use.

The list is read from the source (every `raise` of a user error in `ports/` and `timerome_jax/`),
so a new check cannot be missing from the page: this test fails until the page is regenerated with

    python tests/test_inputs_page.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "inputs.md"
ERRORS = {"InputError", "UserError", "CheckpointError", "ConfigError"}
MARK = "<!-- generated below by tests/test_inputs_page.py: do not edit by hand -->"


def _render(node: ast.expr) -> str:
    """An error message as its user reads it, with each interpolated value shown as {name}."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            else:
                parts.append("{" + ast.unparse(value.value) + "}")
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _render(node.left) + _render(node.right)
    return "{" + ast.unparse(node) + "}"


def checks() -> dict[str, list[str]]:
    """{module path: [message, ...]} in source order, duplicates within a module dropped."""
    out: dict[str, list[str]] = {}
    for path in sorted(list((ROOT / "ports").rglob("*.py")) + list((ROOT / "timerome_jax").rglob("*.py"))):
        found: list[str] = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args and \
                    getattr(node.exc.func, "id", None) in ERRORS:
                message = " ".join(_render(node.exc.args[0]).split())
                if message not in found:
                    found.append(message)
        if found:
            out[str(path.relative_to(ROOT))] = found
    return out


def generated() -> str:
    lines = [MARK, ""]
    for module, messages in checks().items():
        lines += [f"### `{module}`", ""] + [f"- {m.replace('|', '/')}" for m in messages] + [""]
    return "\n".join(lines)


def test_the_page_lists_every_check_in_the_errors_words():
    text = PAGE.read_text()
    assert MARK in text, "docs/inputs.md lost its generated part"
    assert text[text.index(MARK):].rstrip() == generated().rstrip(), \
        "docs/inputs.md is out of date: run `python tests/test_inputs_page.py`"


if __name__ == "__main__":
    head = PAGE.read_text().split(MARK)[0] if PAGE.exists() else ""
    PAGE.write_text(head + generated())
    print(f"wrote {PAGE} ({sum(map(len, checks().values()))} checks)")
    sys.exit(0)
