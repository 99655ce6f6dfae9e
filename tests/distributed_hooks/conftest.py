"""One torchrun launch per world size serves every multi-process check of this folder."""

import pytest

from .common import launch


@pytest.fixture(scope="session", params=[2, 4], ids=["2 ranks", "4 ranks"])
def report(request, tmp_path_factory):
    return launch("hook_worker.py", request.param, tmp_path_factory.mktemp("hooks"))
