import os
from pathlib import Path

import pytest

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
