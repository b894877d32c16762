"""Run every test once per instruction-set variant this CPU supports.

The kernel is one C body compiled per instruction set; a bug in one variant
(lane tails, masks, the vector exp) must not hide behind the fastest one, so
the whole suite is parametrised over fastce.available_isas().
"""
import pytest

import fastce


@pytest.fixture(autouse=True, params=fastce.available_isas(), ids=lambda name: f"isa={name}")
def isa(request):
    with fastce.use_isa(request.param):
        yield request.param
