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


def pytest_configure(config):
    # tools/test.sh runs the suite against the installed wheel: make sure that is what
    # is imported (not src/ through some path), or the run would test the wrong thing.
    import os
    if os.environ.get("FASTCE_TEST_INSTALLED") == "1":
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        where = os.path.abspath(fastce.__file__)
        if where.startswith(os.path.join(root, "src") + os.sep) or "site-packages" not in where:
            raise pytest.UsageError(
                f"FASTCE_TEST_INSTALLED=1 but fastce was imported from {where}, "
                "not from an installed wheel")
