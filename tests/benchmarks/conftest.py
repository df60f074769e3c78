import pytest

from benchmarks import common


@pytest.fixture(autouse=True)
def _restore_smoke():
    # A script's main() sets the module-wide --smoke switch; later tests must not inherit it.
    smoke = common.SMOKE
    yield
    common.SMOKE = smoke
