"""The examples in the README and in docstrings run as written."""

import doctest
import importlib
import importlib.util
import pathlib
import re
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULES = ["pipellm", "pipellm.hostmem", "pipellm.channel.keys", "pipellm.devices", "pipellm.devices.base", "pipellm.devices.emulated",
           "pipellm.devices.gpupath", "pipellm.devices.cuda_driver",
           "pipellm.pipeline.pipeline", "pipellm.testing", "pipellm.predictors.simple", "pipellm._ext.memcopy",
           "pipellm._ext.bounce", "pipellm._ext.fence", "pipellm._ext.intmap", "pipellm.devices._clock", "pipellm._ext.locks", "pipellm.benchmarks.offload",
           "pipellm.traces.summary", "pipellm.timeline", "pipellm.traces.intervals", "pipellm.traces.explain",
           "pipellm.traces.model", "pipellm.pipeline.threshold", "pipellm.pipeline.payoff", "pipellm.pipeline.ondemand"]


def test_readme_python_examples_run():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:  # (a block inside a list item is indented with it)
        if "integrations.accelerate" in block and not all(importlib.util.find_spec(p) for p in
                                                          ("torch", "transformers", "accelerate")):
            continue  # the accelerate extra is not installed here (CI installs it)
        exec(compile(textwrap.dedent(block), "README.md", "exec"), {})


NEEDS = {"pipellm.integrations.torch": ("torch",), "pipellm.integrations.accelerate": ("torch", "accelerate"),
         "pipellm.integrations.models": ("torch", "transformers")}


@pytest.mark.parametrize("name", MODULES + [*NEEDS, "pipellm.predictors.rules"])
def test_docstring_examples(name):
    for package in NEEDS.get(name, ()):
        pytest.importorskip(package, reason=f"{name}'s examples need {package} (pip install 'pipellm[accelerate]')")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
