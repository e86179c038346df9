import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The four tasks with the PaLM outputs, in the paper's layout (../shared/data beside the repo)."""
    path = Path(os.environ.get("DSBS_DATA_DIR", SHARED_DATA))
    if not (path / "cqa").is_dir():
        pytest.fail(f"test data not found at {path}; set DSBS_DATA_DIR")
    return path
