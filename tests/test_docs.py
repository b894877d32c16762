"""Every example in the public docstrings runs and prints what it says."""
import doctest
import os

import pytest

import fastce
import fastce._core
import fastce.linear
import fastce.reference


@pytest.mark.parametrize("module", [fastce, fastce._core, fastce.reference, fastce.linear],
                         ids=lambda m: m.__name__)
def test_docstring_examples(isa, module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


@pytest.mark.skipif(not os.path.exists(README), reason="source tree not available")
def test_readme_examples(isa):
    result = doctest.testfile(README, module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
