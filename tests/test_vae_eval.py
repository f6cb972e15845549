"""The VAE's test protocol: importance-weighted log-likelihood, ELBO and its parts, active units
and the KL of each latent dimension, batched over samples and examples."""

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from vaeflow.models import VAE


def digits_like(n: int = 120) -> torch.Tensor:
    return torch.randint(0, 2, (n, 16), generator=torch.Generator().manual_seed(0)).float()


def run_test(trainer: pl.Trainer, model: VAE, x: torch.Tensor) -> dict[str, float]:
    return trainer.test(model, DataLoader(x, batch_size=50), verbose=False)[0]


def test_test_logs_active_units_and_the_kl_of_each_dimension(silent_trainer) -> None:
    """Active units (variance over the data of E_q[z_j | x] above 0.01) and per-dimension KLs
    (kl_dim_0..; zero-padded, kl_dim_00.., from 11 dimensions) equal the same quantities
    computed over the whole test set at once."""
    torch.manual_seed(0)
    model = VAE((16,), latent_dim=4, eval_samples=30)
    with torch.no_grad():  # dimensions 0 and 2 vary with x, 1 and 3 do not: inactive
        model.encoder.layers[-1].weight[[0, 2]] *= 10.0
        model.encoder.layers[-1].weight[[1, 3]] = 0.0
    x = digits_like()
    metrics = run_test(silent_trainer(), model, x)
    with torch.no_grad():
        posterior = model.encode(x)
        variance = posterior.mean.var(0, unbiased=False)
        kl_dims = model.kl_per_dimension(posterior, posterior.sample()).mean(0)
    assert metrics["test/active_units"] == int((variance > 0.01).sum()) == 2
    for j in range(4):
        assert metrics[f"test/kl_dim_{j}"] == pytest.approx(kl_dims[j].item(), rel=1e-5)
    assert sum(metrics[f"test/kl_dim_{j}"] for j in range(4)) == pytest.approx(
        metrics["test/kl"], rel=1e-5
    )
    assert metrics["test/elbo"] == pytest.approx(
        metrics["test/reconstruction"] - metrics["test/kl"], rel=1e-5
    )
    assert metrics["test/log_likelihood"] >= metrics["test/elbo"] - 0.5
    assert math.isfinite(metrics["test/log_likelihood_bits_per_dim"])


def test_the_likelihood_estimate_is_the_same_whatever_the_chunking() -> None:
    """All samples in one chunk give log mean exp of the weights of the same draws; chunks of
    7 estimate the same number."""
    torch.manual_seed(0)
    model = VAE((16,), latent_dim=3)
    x = digits_like(10)
    torch.manual_seed(1)
    whole = model.log_likelihood(x, 50, chunk_size=50)
    torch.manual_seed(1)
    posterior = model.encode(x)
    z = posterior.sample((50,))
    exact = model.log_weights(x, z, posterior).logsumexp(0) - math.log(50)
    torch.testing.assert_close(whole, exact.detach())
    torch.manual_seed(1)
    chunked = model.log_likelihood(x, 2000, chunk_size=7)
    assert chunked.shape == (10,)
    # chunks draw their own samples: the same estimand, within Monte-Carlo error at K = 2000
    torch.testing.assert_close(chunked, model.log_likelihood(x, 2000), rtol=0, atol=0.1)


def test_the_default_chunk_bounds_the_decoder_outputs(monkeypatch) -> None:
    """K = 5000 importance samples pass the decoder in chunks of at most the bound's outputs."""
    from vaeflow.models import vae

    torch.manual_seed(0)
    model = VAE((16,), latent_dim=3)
    sizes = []
    decoder_outputs = model.decoder_outputs

    def recording(z: torch.Tensor, *args: object) -> torch.Tensor:
        sizes.append(z.shape[:-1].numel())
        return decoder_outputs(z, *args)

    monkeypatch.setattr(model, "decoder_outputs", recording)
    monkeypatch.setattr(vae, "CPU_EVAL_CHUNK_NUMBERS", 16 * 100 * 64)
    model.log_likelihood(digits_like(100), 5000)
    assert max(sizes) * 16 <= 16 * 100 * 64 and sum(sizes) == 5000 * 100


def test_predict_writes_codes_and_the_spread_of_samples_and_reconstructions(
    silent_trainer, tmp_path
) -> None:
    """With predict_samples, latents.pt holds per example the posterior mean, the spread of
    the posterior samples (their standard deviation estimates q's: within 15% at S = 200) and
    the spread of their reconstructions, one row per example in data order."""
    torch.manual_seed(0)
    model = VAE((16,), latent_dim=3, predict_samples=200)
    x = digits_like(30)
    silent_trainer().predict(model, DataLoader(x, batch_size=8), return_predictions=False)
    written = torch.load(tmp_path / "latents.pt")
    posterior = model.encode(x)
    torch.testing.assert_close(written["latents"], posterior.mean.detach())
    torch.testing.assert_close(
        written["latent_spread"], posterior.stddev.detach(), rtol=0.15, atol=0
    )
    assert written["reconstruction_spread"].shape == (30, 16)
    assert (written["reconstruction_spread"] > 0).all()


def test_bits_per_dim_of_a_probability_mass_on_the_pixel_levels_take_no_offset(
    silent_trainer,
) -> None:
    """A 256-way categorical is a mass on the 8-bit grid already: its bits/dim are
    -log p / (D ln 2) whatever the data module's log scale; a density's take the offset."""
    x = (torch.randint(0, 256, (20, 16), generator=torch.Generator().manual_seed(0)) / 255).float()
    for likelihood, offset in (("categorical", 0.0), ("gaussian", math.log(256))):
        torch.manual_seed(0)
        model = VAE((16,), latent_dim=2, likelihood=likelihood, data_log_scale=math.log(256))
        metrics = run_test(silent_trainer(), model, x)
        expected = (16 * offset - metrics["test/elbo"]) / (16 * math.log(2))
        assert metrics["test/elbo_bits_per_dim"] == pytest.approx(expected, rel=1e-5)


def test_per_dimension_names_sort_in_order() -> None:
    from vaeflow.models.vae import dimension_names

    assert dimension_names("kl_dim", 4) == ["kl_dim_0", "kl_dim_1", "kl_dim_2", "kl_dim_3"]
    names = dimension_names("kl_dim", 50)
    assert names[0] == "kl_dim_00" and names[-1] == "kl_dim_49" and sorted(names) == names


def test_an_evaluation_that_would_take_too_long_is_refused_with_its_time() -> None:
    from vaeflow.errors import ConfigError
    from vaeflow.models.vae import check_evaluation_time

    model = VAE((4,), 2, eval_samples=10**12)
    with pytest.raises(
        ConfigError,
        match=r"eval_samples=1000000000000 on the 8 val examples "
        r"takes about [\d.e+]+ (h|d) on this machine .*longer than 1 h",
    ):
        check_evaluation_time(model, torch.rand(8, 4), "val", 3600.0)
    model.eval_samples = 10
    check_evaluation_time(model, torch.rand(8, 4), "val", 3600.0)  # milliseconds: accepted
