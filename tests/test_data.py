import datasets
import pytest

from dsbs_ray.data import attach_teacher, carve_validation, fraction_indices
from dsbs_ray.errors import UserError
from dsbs_ray.tasks import get_task, load_examples, load_teacher_outputs

FRACTIONS = [0.125, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_fractions_are_nested_for_one_seed(seed):
    samples = [set(fraction_indices(1000, f, seed)) for f in FRACTIONS]
    assert [len(s) for s in samples] == [125, 250, 500, 750, 1000]
    for small, large in zip(samples, samples[1:]):
        assert small < large


def test_fractions_are_deterministic_and_seed_dependent():
    assert fraction_indices(800, 0.25, 3) == fraction_indices(800, 0.25, 3)
    assert fraction_indices(800, 0.25, 3) != fraction_indices(800, 0.25, 4)
    assert fraction_indices(800, 0.25, 3) == sorted(fraction_indices(800, 0.25, 3))
    assert fraction_indices(5, 0.01, 0) != []  # never an empty training set


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_fraction_out_of_range(bad):
    with pytest.raises(UserError, match="fraction must be in"):
        fraction_indices(100, bad, 0)


@pytest.mark.parametrize("n", [800, 9741, 11])
def test_validation_carve_matches_the_papers_split(n):
    """Same rows as datasets' train_test_split(test_size=0.1, seed=0), which the paper's run.py uses."""
    ds = datasets.Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=0.1, seed=0)
    train, valid = carve_validation(n)
    assert train == ds["train"]["i"] and valid == ds["test"]["i"]
    assert sorted(train + valid) == list(range(n))


def test_attach_teacher(data_dir):
    task = get_task("svamp")
    rows = attach_teacher(load_examples("svamp", "test", data_dir),
                          load_teacher_outputs("svamp", "test", data_dir), task, "svamp/test")
    assert len(rows) == 200
    assert rows[0].teacher_label == "(10 * 45)" and rows[0].rationale.endswith("10 * 45 is 450.")


def test_attach_teacher_count_mismatch_names_both_counts(data_dir):
    examples = load_examples("svamp", "test", data_dir)
    with pytest.raises(UserError, match="199 teacher outputs for 200 rows"):
        attach_teacher(examples, ["x"] * 199, get_task("svamp"), "svamp/test")
