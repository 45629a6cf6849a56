"""The examples in the README and in docstrings run as written."""

import doctest
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULES = ["pipellm", "pipellm.hostmem", "pipellm.channel.keys", "pipellm.devices", "pipellm.devices.emulated",
           "pipellm.pipeline.pipeline", "pipellm.testing", "pipellm.predictors.simple", "pipellm._ext.memcopy",
           "pipellm._ext.bounce"]


def test_readme_python_examples_run():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
