import os
from pathlib import Path

import pytest
import torch

# Where no GPU is visible, Triton kernels are tested in Triton's interpreter. The switch is read
# when triton is first imported (torch's inductor imports it during collection), hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"


def fixture_dir(name: str) -> Path:
    """The golden-data folder ``../shared/fixtures/<name>``; skips (saying why) only when absent."""
    path = FIXTURES / name
    if not path.is_dir():
        if os.environ.get("CI"):  # CI always has shared/ beside the clone: a missing folder is a failure
            pytest.fail(f"golden fixtures not found at {path}")
        pytest.skip(f"golden fixtures not found at {path} (they live in the team's shared/ folder)")
    return path


@pytest.fixture(scope="module")
def single_thread():
    """For modules that run tiny models: each op is latency-bound, and a 2-thread OpenMP pool on
    a busy 2-core machine costs ~10x in barriers. One thread is faster and gives the same numbers."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session", autouse=True)
def _single_threaded_session():
    """Every model in the suite is tiny: one thread avoids OpenMP barrier stalls on a shared
    2-core machine (measured 10x on some modules) and changes no tolerance-checked result."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
