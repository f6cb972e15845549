"""Property-based tests (hypothesis): the array data module's checks and the likelihoods' support
checks accept every valid input and refuse every invalid one with a DataError."""

from __future__ import annotations

import tempfile
from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vaeflow.data import ArrayDataModule
from vaeflow.data.array import read_array
from vaeflow.errors import DataError
from vaeflow.registry import LIKELIHOODS

PROPERTY = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
FINITE = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
#: arrays of one or more examples of one or more values, any rank from 2 to 4
EXAMPLES = hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=5)


def saved(array: np.ndarray, suffix: str = ".npy") -> Path:
    folder = Path(tempfile.mkdtemp())
    path = folder / f"data{suffix}"
    if suffix == ".npy":
        np.save(path, array)
    else:
        torch.save(torch.from_numpy(array), path)
    return path


@PROPERTY
@given(hnp.arrays(np.float32, EXAMPLES, elements=FINITE), st.sampled_from([".npy", ".pt"]))
def test_every_finite_array_reads_back_as_it_was(array: np.ndarray, suffix: str) -> None:
    read = read_array(saved(array, suffix))
    assert tuple(read.shape) == array.shape
    assert np.array_equal(np.asarray(read), array)
    module = ArrayDataModule(str(saved(array, suffix)), val_fraction=0.0, scale=False)
    assert module.dims == (int(np.prod(array.shape[1:])),)


@PROPERTY
@given(
    hnp.arrays(np.float64, hnp.array_shapes(min_dims=0, max_dims=1, max_side=6), elements=FINITE)
)
def test_arrays_of_rank_below_two_are_refused(array: np.ndarray) -> None:
    with pytest.raises(DataError, match=r"expected \(N, \.\.\.\)"):
        read_array(saved(array))


@PROPERTY
@given(
    hnp.arrays(np.float64, st.tuples(st.integers(2, 8), st.integers(1, 4)), elements=FINITE),
    st.data(),
)
def test_any_nan_or_infinity_is_refused_with_its_row(
    array: np.ndarray, data: st.DataObject
) -> None:
    row = data.draw(st.integers(0, array.shape[0] - 1))
    column = data.draw(st.integers(0, array.shape[1] - 1))
    array[row, column] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    module = ArrayDataModule(str(saved(array)), val_fraction=0.0, scale=False)
    with pytest.raises(DataError, match="NaN or infinite") as error:
        module.setup("fit")
    assert f"row {row}" in str(error.value)


@PROPERTY
@given(hnp.arrays(hnp.scalar_dtypes().filter(lambda d: d.kind in "OSUMmV"), (3, 2)))
def test_non_numeric_arrays_are_refused(array: np.ndarray) -> None:
    path = Path(tempfile.mkdtemp()) / "data.npy"
    np.save(path, array, allow_pickle=True)
    with pytest.raises(DataError):
        read_array(path)


#: likelihood -> (values inside its support, values outside it)
SUPPORTS = {
    "bernoulli": (
        st.floats(0, 1),
        st.floats(1e-6, 1e6).flatmap(lambda e: st.sampled_from([-e, 1 + e])),
    ),
    "continuous_bernoulli": (
        st.floats(0, 1),
        st.floats(1e-6, 1e6).flatmap(lambda e: st.sampled_from([-e, 1 + e])),
    ),
    "categorical": (
        st.integers(0, 255).map(lambda k: k / 255),
        st.integers(0, 254).flatmap(lambda k: st.floats(0.1, 0.9).map(lambda f: (k + f) / 255)),
    ),
    # torch's ``real`` constraint holds infinities too; the data modules refuse them earlier
    "gaussian": (FINITE, st.just(np.nan)),
}


@pytest.mark.parametrize("name", SUPPORTS)
def test_support_checks_accept_their_support_and_refuse_the_rest(name: str) -> None:
    likelihood = LIKELIHOODS.build(name)
    inside, outside = SUPPORTS[name]

    @PROPERTY
    @given(st.lists(inside, min_size=1, max_size=12), st.lists(outside, min_size=1, max_size=3))
    def check(good: list[float], bad: list[float]) -> None:
        likelihood.check_support(torch.tensor(good, dtype=torch.float64).reshape(-1, 1))
        mixed = torch.tensor(good + bad, dtype=torch.float64).reshape(-1, 1)
        with pytest.raises(DataError, match=f"{len(bad)} data values lie outside the support"):
            likelihood.check_support(mixed)

    check()
