"""Every example in the public docstrings runs and prints what it says."""
import doctest

import pytest

import fastce
import fastce._core
import fastce.reference


@pytest.mark.parametrize("module", [fastce, fastce._core, fastce.reference],
                         ids=lambda m: m.__name__)
def test_docstring_examples(isa, module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
