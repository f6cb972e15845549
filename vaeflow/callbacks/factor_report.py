"""What a factor-analysis fit reports, as psych's ``fa`` prints it: ``loadings.csv``,
``summary.txt`` and the scree picture ``scree.png`` in the run folder, and the fit statistics on
the console."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from vaeflow.analysis.summary import LoadingSummary, summarize
from vaeflow.callbacks.tracking import run_dir

if TYPE_CHECKING:
    from vaeflow.models.fa import FactorAnalysis

LOADINGS_FILE = "loadings.csv"
SUMMARY_FILE = "summary.txt"
SCORES_FILE = "scores.csv"
SCREE_FILE = "scree.png"
#: Most features for which a fit's report runs parallel analysis: 100 eigendecompositions of
#: D x D matrices, under a second at D = 200, growing as D^3.
SCREE_MAX_DIM = 200


def feature_names(trainer: Trainer, dim: int) -> list[str]:
    """The data module's ``feature_names`` (a CSV header), else x1..xD."""
    names = getattr(trainer.datamodule, "feature_names", None)
    return (
        list(names)
        if names is not None and len(names) == dim
        else [f"x{d + 1}" for d in range(dim)]
    )


def write_scores(trainer: Trainer, path: Path, scores: Tensor) -> None:
    """Factor scores as a CSV table: one row per example of the prediction data, first its row
    number in the file it came from (the data module's ``indices``, when it has them), then
    F1..FM as in ``loadings.csv``."""
    indices = getattr(trainer.datamodule, "indices", {}).get("test")
    rows = indices.tolist() if indices is not None and len(indices) == len(scores) else None
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        factors = [f"F{j + 1}" for j in range(scores.shape[1])]
        writer.writerow(["row", *factors] if rows is not None else factors)
        for index, values in enumerate(scores.tolist()):
            cells = [f"{v:.10g}" for v in values]
            writer.writerow([rows[index], *cells] if rows is not None else cells)


def statistics_lines(statistics: dict[str, float] | None) -> list[str]:
    """psych's lines about the fit (maximum likelihood, Bartlett-corrected chi-square)."""
    if not statistics:
        return [
            "Fit statistics: none (they need the moments method and a covariance matrix of "
            "full rank: no constant or collinear feature)."
        ]
    s = statistics
    return [
        f"Log-likelihood: {s['log_likelihood']:.4f} nats per example",
        f"Chi-square (Bartlett's correction): {s['chi_square']:.2f} on {s['dof']:g} degrees of "
        f"freedom, p = {s['p_value']:.4g}",
        f"RMSEA: {s['rmsea']:.4f}, 90% interval [{s['rmsea_lower']:.4f}, {s['rmsea_upper']:.4f}]",
        f"Tucker-Lewis index: {s['tli']:.4f}   BIC: {s['bic']:.2f}   SRMR: {s['srmr']:.4f}",
    ]


def parallel_analysis_lines(model: FactorAnalysis, folder: Path) -> list[str]:
    """Parallel analysis (:func:`vaeflow.analysis.parallel_analysis`) of the correlation matrix
    of the fitted covariance, its scree picture written to ``folder``; the report's line."""
    # here: vaeflow.analysis.selection imports the models, which import this module
    from vaeflow.analysis.selection import parallel_analysis

    if model.fitted_covariance is None:
        return ["Parallel analysis: none (the streaming fit forms no covariance matrix)."]
    if model.dim > SCREE_MAX_DIM:
        return [
            f"Parallel analysis: not run for D = {model.dim} > {SCREE_MAX_DIM} features "
            "(vaeflow.analysis.parallel_analysis runs it from Python)."
        ]
    cov, num_obs = model.fitted_covariance
    std = cov.diagonal().sqrt().cpu()
    if not (std > 0).all():
        return ["Parallel analysis: none (a feature is constant)."]
    analysis = parallel_analysis(cov.cpu() / torch.outer(std, std), num_obs)
    analysis.picture(folder / SCREE_FILE)
    return [
        f"Parallel analysis (eigenvalues of the correlation matrix above the 95th percentile of "
        f"random data's): {analysis.num_factors} factor(s); picture: {SCREE_FILE}"
    ]


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]


def summary_text(
    model: FactorAnalysis, names: list[str], summary: LoadingSummary, selection: list[str]
) -> str:
    """The psych-style report: standardised loadings with communalities (h2) and
    uniquenesses (u2), variance explained, factor correlations, the fit statistics and
    ``selection``, the lines about the number of factors."""
    factors = [f"F{j + 1}" for j in range(model.latent_dim)]
    lines = [
        f"Factor analysis by maximum likelihood: {model.latent_dim} factors, {model.dim} "
        f"features, rotation: {model.hparams.rotation}",
        f"EM iterations: {int(model.n_iter)} (stopped: {model.stop_reason or 'not fitted'})",
        "",
        "Standardised loadings (pattern matrix):",
        *table(
            ["", *factors, "h2", "u2"],
            [
                [name, *(f"{v:.3f}" for v in row), f"{h2:.3f}", f"{u2:.3f}"]
                for name, row, h2, u2 in zip(
                    names,
                    summary.pattern.tolist(),
                    summary.communalities.tolist(),
                    summary.uniquenesses.tolist(),
                    strict=True,
                )
            ],
        ),
        "",
        *table(
            ["", *factors],
            [
                [label, *(f"{v:.3f}" for v in values.tolist())]
                for label, values in (
                    ("SS loadings", summary.variance),
                    ("Proportion Var", summary.proportion_variance),
                    ("Cumulative Var", summary.cumulative_variance),
                    ("Proportion Explained", summary.proportion_explained),
                    ("Cumulative Proportion", summary.cumulative_proportion),
                )
            ],
        ),
        "",
        "Factor correlations (Phi):",
        *table(
            ["", *factors],
            [
                [f, *(f"{v:.3f}" for v in row)]
                for f, row in zip(factors, summary.phi.tolist(), strict=True)
            ],
        ),
        "",
        *statistics_lines(model.fit_statistics),
        *selection,
    ]
    return "\n".join(lines) + "\n"


class FactorReport(Callback):
    """At the end of a fit, the rotated solution (:meth:`FactorAnalysis.rotated`) on the
    correlation scale: ``loadings.csv`` (one row per feature: loadings, h2, u2),
    ``summary.txt`` and ``scree.png`` (:meth:`vaeflow.analysis.ParallelAnalysis.picture`, for
    up to :data:`SCREE_MAX_DIM` features) in the run folder, and the fit statistics on the
    console. A fit without a logger has no run folder (``vaeflow.sklearn``, a trainer of the
    user's): nothing then."""

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.loggers:
            return
        folder = run_dir(trainer)  # collective: every process calls it
        if not trainer.is_global_zero:
            return
        model: FactorAnalysis = pl_module  # type: ignore[assignment]
        rotation = model.rotated()
        summary = summarize(rotation.loadings, model.noise_variance.detach(), rotation.phi)
        names = feature_names(trainer, model.dim)
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / LOADINGS_FILE).open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(
                ["feature", *(f"F{j + 1}" for j in range(model.latent_dim)), "h2", "u2"]
            )
            for name, row, h2, u2 in zip(
                names,
                summary.pattern.tolist(),
                summary.communalities.tolist(),
                summary.uniquenesses.tolist(),
                strict=True,
            ):
                writer.writerow([name, *(f"{v:.6g}" for v in row), f"{h2:.6g}", f"{u2:.6g}"])
        selection = parallel_analysis_lines(model, folder)
        (folder / SUMMARY_FILE).write_text(summary_text(model, names, summary, selection))
        print(
            f"Factor analysis: {int(model.n_iter)} EM iterations, stopped by "
            f"{model.stop_reason}; loadings in {folder / LOADINGS_FILE}, report in "
            f"{folder / SUMMARY_FILE}"
        )
        for line in statistics_lines(model.fit_statistics):
            print(line)
