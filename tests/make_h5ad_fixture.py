"""Write ``tests/data/anndata_0.12.h5ad``: a tiny AnnData file written by anndata itself, so that
``tests/test_h5ad.py`` checks vaeflow's h5py reader against the real writer, not only against
the files :func:`write_h5ad` writes here (with h5py, for the tests and the shipped config).

Run with an environment that has anndata (``pip install anndata``; vaeflow need not be
installed): ``python tests/make_h5ad_fixture.py``. The values come from :func:`cells`, which the
tests call to know what the file must hold. It never overwrites the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

FIXTURE = Path(__file__).resolve().parent / "data" / "anndata_0.12.h5ad"
#: The batches' categories in the order anndata stores them (not sorted: the order is kept).
BATCHES = ["b2", "b1", "b3"]


def cells() -> dict[str, np.ndarray]:
    """40 cells x 12 genes of negative-binomial counts with a batch effect, and their obs."""
    rng = np.random.default_rng(24)
    batch = rng.integers(0, 3, 40)
    rate = rng.gamma(2.0, 2.0, 12) * np.array([1.0, 2.0, 4.0])[batch, None]
    counts = rng.poisson(rng.gamma(2.0, rate / 2.0)).astype(np.int32)
    return {
        "counts": counts,
        "batch": batch,  # codes into BATCHES
        "cell_type": rng.integers(0, 2, 40),  # codes into ["T", "B"]
        "score": rng.normal(size=40),
    }


def write_h5ad(path: Path, counts: np.ndarray, obs: dict[str, np.ndarray]) -> None:
    """A minimal AnnData file written with h5py: counts as X (CSR) and as layer ``counts``
    (dense), text obs columns as categoricals (sorted categories), gene names; the attributes
    anndata writes."""
    import h5py

    def frame(group: Any, names: list[str], columns: list[str]) -> None:
        group.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.2.0"})
        group.attrs["_index"] = "_index"
        group.attrs["column-order"] = columns
        group.create_dataset("_index", data=names, dtype=h5py.string_dtype())

    with h5py.File(path, "w") as file:
        file.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        rows, columns = np.nonzero(counts)
        x = file.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0"})
        x.attrs["shape"] = counts.shape
        x["data"], x["indices"] = counts[rows, columns].astype(np.float32), columns
        x["indptr"] = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(counts)))])
        file.create_group("layers")["counts"] = counts
        obs_group = file.create_group("obs")
        frame(obs_group, [f"cell{i}" for i in range(len(counts))], list(obs))
        for key, values in obs.items():
            categories, codes = np.unique(values, return_inverse=True)
            column = obs_group.create_group(key)
            column.attrs["encoding-type"] = "categorical"
            column["codes"] = codes.astype(np.int8)
            column.create_dataset("categories", data=categories.tolist(), dtype=h5py.string_dtype())
        frame(file.create_group("var"), [f"g{j}" for j in range(counts.shape[1])], [])


def example_file(path: Path) -> None:
    """90 cells x 15 genes of counts from three batches (``lab1`` to ``lab3``), as
    ``configs/nb_cvae_h5ad.yaml`` expects (``cells.h5ad``: layer ``counts``, obs ``batch``)."""
    rng = np.random.default_rng(0)
    batches = rng.choice(["lab1", "lab2", "lab3"], 90)
    counts = rng.poisson(rng.gamma(2.0, 3.0, (90, 15))).astype(np.int32)
    write_h5ad(path, counts, {"batch": batches})


def main() -> None:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    if FIXTURE.exists():
        raise SystemExit(f"{FIXTURE} exists: it is never regenerated")
    values = cells()
    plate = pd.array([1, 2] * 19 + [None, 2], dtype="Int64")  # one cell without a plate
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical.from_codes(values["batch"], BATCHES),
            "cell_type": pd.Categorical.from_codes(values["cell_type"], ["T", "B"]),
            "score": values["score"],
            "plate": plate,
            "donor": np.array(["d1", "d2"])[values["batch"] % 2],
        },
        index=[f"cell{i}" for i in range(40)],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(12)])
    data = ad.AnnData(sp.csr_matrix(values["counts"].astype(np.float32)), obs=obs, var=var)
    data.layers["counts"] = values["counts"]
    data.layers["csc"] = sp.csc_matrix(values["counts"])
    data.layers["log1p"] = np.log1p(values["counts"]).astype(np.float32)
    data.write_h5ad(FIXTURE, convert_strings_to_categoricals=False)
    print(f"wrote {FIXTURE} with anndata {ad.__version__}")


if __name__ == "__main__":
    main()
