"""The README's Python examples run as written."""

from __future__ import annotations

import re

from recurrent_bn.config import CONF_DIR

README = CONF_DIR.parent / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
