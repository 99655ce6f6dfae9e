"""accelerate keeps its state in process-wide singletons; each test starts from none."""

import pytest


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    import sys

    if "accelerate" in sys.modules:  # only tests that used accelerate have state to drop
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
