"""The README's Python example runs as printed, and the numbers it prints move the way it says."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs_as_printed():
    text = README.read_text()
    section = text[text.index("## Python API in one screen"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    printed = out.getvalue()
    lp = {name: (float(f), float(r)) for name, f, r in
          re.findall(r"(no edit|edited): ForgetLP (-?[\d.]+), RetainLP (-?[\d.]+)", printed)}
    assert set(lp) == {"no edit", "edited"}, printed
    assert lp["edited"][0] < lp["no edit"][0] - 1.0, printed      # the memory lowers the forget answers' LP
