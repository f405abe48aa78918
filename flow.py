"""
Rectified flow as SANA trains and samples it: every piece defined once, imported by train.py (noising, the
velocity target), sample.py (the sigma grid, the Euler and DPM-Solver++ steps) and prune.py (its calibration
timesteps are the sampler's grid). A file of its own because three scripts share it and model.py stays the
network alone.

The path is straight: x_sigma = (1 - sigma) x0 + sigma noise, sigma = 1 pure noise, sigma = 0 the image. The
model predicts the velocity v = dx/dsigma = noise - x0 at timestep 1000 sigma, so x0 = x - sigma v at any sigma.
- Flow shift (SANA: 3.0 at 1024px): sigma' = s sigma / (1 + (s - 1) sigma), more time at high noise; used
  both for training timesteps and for the sampler grid.
- The grid: sigma uniform in [0.999, 0], then shifted (the official "time_uniform_flow" grid).
- Flow-Euler: x <- x + (sigma_next - sigma) v.
- Flow-DPM-Solver++ (2nd-order multistep, data prediction): alpha = 1 - sigma, lambda = log(alpha / sigma),
  h = lambda_t - lambda_s, x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^-h) D with D = x0 + (x0 - x0_prev)
  (h / h_prev) / 2, first order on the first step; the last step (sigma_t = 0) returns x0 itself, the
  official "lower_order_final".
"""

import math

import torch

SIGMA_MAX = 0.999  # the grid's first sigma (the official sampler never starts at exactly 1)
SAMPLERS = ("euler", "dpm++")


def shift_sigma(sigma, shift):
    """SANA's flow shift: sigma' = s*sigma / (1 + (s-1)*sigma); s > 1 spends more time at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_grid(steps, shift, sigma_max=SIGMA_MAX):
    """The sampler's sigmas, high to low, ending at 0: (steps + 1,) float64."""
    return shift_sigma(torch.linspace(sigma_max, 0.0, steps + 1, dtype=torch.float64), shift)


def timestep(sigma):
    """The model's timestep input for noise level sigma (SANA's 1000-step scale, kept continuous)."""
    return sigma * 1000.0


def make_noise(shape, seed):
    """Gaussian noise from its own seeded generator: the same seed gives the same noise on any device."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def add_noise(x0, noise, sigma):
    """x_sigma = (1 - sigma) x0 + sigma noise; sigma (B,) broadcasts over the image dims."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise


def velocity_target(x0, noise):
    """What the model learns to predict at every sigma: d x_sigma / d sigma."""
    return noise - x0


def predicted_x0(x, sigma, v):
    """The clean image the velocity points at (the sampler's data prediction)."""
    return x - sigma * v


def step(sampler, x, v, s, t, prev=None):
    """One step from sigma s to sigma t < s given the velocity v at (x, s).
    prev: DPM-Solver++'s memory of the previous step (None on the first). -> (x at t, memory for the next)."""
    if sampler == "euler":
        return x + (t - s) * v, None
    x0 = predicted_x0(x, s, v)
    if t == 0.0:  # final step: alpha_t = 1, sigma_t = 0 -> the data prediction itself
        return x0, None
    h = math.log((1 - t) / t) - math.log((1 - s) / s)  # lambda_t - lambda_s
    D = x0 if prev is None else x0 + (x0 - prev[0]) * (h / prev[1]) / 2  # 2nd order after the first step
    return (t / s) * x + (1 - t) * (1 - math.exp(-h)) * D, (x0, h)


def integrate(velocity, noise, steps, shift, sampler="dpm++", verdict=None):
    """x from noise at sigma_max to sigma = 0. velocity(x, sigma) -> v, called once per step; x kept fp32.
    verdict(k, x0) -> rows or None, called after the k-th velocity (k = 0 .. steps - 1) with the data prediction
    x0 = x - sigma v of every row: only the rows it returns go on (x, v and the sampler's memory alike), so a
    row finishes exactly as it would have alone. -> x0 of the rows that went on to the end."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}': use one of {', '.join(SAMPLERS)}")
    sigmas = sigma_grid(steps, shift).tolist()
    x, prev = noise.float(), None
    for k, (s, t) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        v = velocity(x.to(noise.dtype), s)
        rows = verdict(k, predicted_x0(x, s, v)) if verdict else None
        if rows is not None:
            x, v = x[rows], v[rows]
            prev = None if prev is None else (prev[0][rows], prev[1])  # DPM-Solver++'s last x0, row by row
        x, prev = step(sampler, x, v, s, t, prev)
    return x
