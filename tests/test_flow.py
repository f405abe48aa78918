"""flow.py: the one definition of rectified flow, and the training target tied to the sampler's convention."""
import math

import pytest
import torch

import flow
from train import TrainConfig, flow_loss


def test_shift_and_grid_by_hand():
    assert flow.shift_sigma(0.5, 3.0) == pytest.approx(1.5 / 2.0)  # s sigma / (1 + (s - 1) sigma)
    grid = flow.sigma_grid(4, 3.0)
    by_hand = [3 * u / (1 + 2 * u) for u in (0.999, 0.999 * 0.75, 0.999 * 0.5, 0.999 * 0.25, 0.0)]
    assert grid.tolist() == pytest.approx(by_hand, abs=1e-12)
    assert flow.sigma_grid(4, 1.0).tolist() == pytest.approx([0.999, 0.74925, 0.4995, 0.24975, 0.0])


def test_noising_and_target_agree_with_the_data_prediction():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    sigma = torch.tensor([0.9, 0.5, 0.1])
    x_t = flow.add_noise(x0, noise, sigma)
    assert torch.allclose(x_t[1], 0.5 * x0[1] + 0.5 * noise[1])
    v = flow.velocity_target(x0, noise)
    for i, s in enumerate(sigma.tolist()):  # the sampler's x0 = x - sigma v recovers the clean image exactly
        assert torch.allclose(flow.predicted_x0(x_t[i], s, v[i]), x0[i], atol=1e-6)


class ExactVelocity(torch.nn.Module):
    """Knows the clean batch: returns (x_t - x0) / sigma, the velocity of the straight path through x_t."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x, t, y, mask):
        sigma = (t / 1000.0)[:, None, None, None]
        return (x - self.x0) / sigma


def test_training_loss_of_the_exact_velocity_is_zero():
    """train.py's target and timestep scale are the ones sample.py integrates: a flipped sign or another
    timestep scale makes this loss large."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 2, 4, 4, generator=g)
    batch = {"x": x0, "y": torch.zeros(4, 3, 8), "mask": torch.ones(4, 3, dtype=torch.long)}
    cfg = TrainConfig(flow_shift=3.0)
    loss = flow_loss(ExactVelocity(x0), batch, torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.long), 0, 0, cfg,
                     torch.autocast("cpu", enabled=False))
    assert loss.item() < 1e-8
    zero = flow_loss(lambda x, t, y, m: torch.zeros_like(x), batch, torch.zeros(1, 3, 8),
                     torch.ones(1, 3, dtype=torch.long), 0, 0, cfg, torch.autocast("cpu", enabled=False))
    assert zero.item() > 0.5  # the target itself is far from 0: the check above is not trivial


@pytest.mark.parametrize("sampler", flow.SAMPLERS)
def test_integrating_the_exact_field_lands_on_the_data(sampler):
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    s0 = flow.sigma_grid(8, 3.0)[0].item()
    start = flow.add_noise(x0, noise, torch.full((2,), s0))
    out = flow.integrate(lambda x, s: (x - x0) / s, start, steps=8, shift=3.0, sampler=sampler)
    assert torch.allclose(out, x0, atol=1e-5)


def test_dpm_step_by_hand():
    x, v = torch.tensor([1.0]), torch.tensor([0.5])
    s, t = 0.8, 0.4
    x0 = x - s * v
    h = math.log(0.6 / 0.4) - math.log(0.2 / 0.8)
    first, memory = flow.step("dpm++", x, v, s, t)
    assert torch.allclose(first, (t / s) * x + (1 - t) * (1 - math.exp(-h)) * x0)
    assert torch.equal(memory[0], x0) and memory[1] == pytest.approx(h)
    last, _ = flow.step("dpm++", x, v, s, 0.0)
    assert torch.equal(last, x0)  # sigma 0: the data prediction itself
    euler, _ = flow.step("euler", x, v, s, t)
    assert torch.allclose(euler, x + (t - s) * v)


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="unknown sampler"):
        flow.integrate(lambda x, s: x, torch.zeros(1), 2, 1.0, sampler="heun")


def test_make_noise_is_a_function_of_its_seed():
    assert torch.equal(flow.make_noise((2, 3), 7), flow.make_noise((2, 3), 7))
    assert not torch.equal(flow.make_noise((2, 3), 7), flow.make_noise((2, 3), 8))
