"""pytest-benchmark over the benchmark scripts: ``pytest benchmarks/ --benchmark-only``.

The scripts are named ``bench_*.py`` and pytest collects only ``test_*.py`` by default; this
conftest collects them when pytest is pointed at benchmarks/ (the default run, testpaths =
tests/, never loads it). The project's addopts disable pytest-benchmark for the test suite;
``--benchmark-only`` here turns it back on instead of failing on the two options together.
"""

import pytest


def pytest_configure(config):
    # runs before pytest-benchmark's own (trylast) configure, which rejects --benchmark-only
    # together with the addopts' --benchmark-disable
    if getattr(config.option, "benchmark_only", False):
        config.option.benchmark_enable = True


def pytest_collect_file(file_path, parent):
    # a bench_*.py named on the command line is already collected by pytest itself
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
