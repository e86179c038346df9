import os
from pathlib import Path

import pytest

# This machine has no HF hub: fail hub lookups at once instead of after minutes of retries.
# (Read by huggingface_hub/datasets at import, so set before any test imports them.)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The four tasks with the PaLM outputs, in the paper's layout (../shared/data beside the repo)."""
    path = Path(os.environ.get("DSBS_DATA_DIR", SHARED_DATA))
    if not (path / "cqa").is_dir():
        pytest.fail(f"test data not found at {path}; set DSBS_DATA_DIR")
    return path


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Token caches of the test session go to a temp dir, not ~/.cache/dsbs."""
    os.environ["DSBS_CACHE"] = str(tmp_path_factory.mktemp("dsbs_cache"))


@pytest.fixture(scope="session")
def students(tmp_path_factory) -> dict:
    """The three tiny random-init T5 students, written once per test session."""
    from dsbs_ray.students import make_tiny_students

    return make_tiny_students(tmp_path_factory.mktemp("students"))


@pytest.fixture(scope="module")
def ray_shutdown():
    """Tests that start a local Ray (through train/annotate) share it within a module, then stop it."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
