"""
Text-to-image sampling with SANA's flow samplers, and best-of-N inference scaling (SANA-1.5 Sec. 2.5).

The model predicts the velocity v = noise - x0 of the straight path x_sigma = (1 - sigma) x0 + sigma noise.
- Flow-Euler: x <- x + (sigma_next - sigma) v.
- Flow-DPM-Solver++ (2nd-order multistep, data prediction): with alpha = 1 - sigma, lambda = log(alpha / sigma)
  and x0 = x - sigma v, one step is x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) (D0 + D1 / 2),
  D1 a finite difference of x0 over the previous step; the first and the last steps are first order
  (the official "lower_order_final").
- Classifier-free guidance on all latent channels: v = v_null + cfg (v_text - v_null), one batched forward.
- The schedule: sigma uniform in [0.999, 0] then shifted by the flow shift (SANA: 3.0 at 1024px), as the
  official "time_uniform_flow" grid.
"""

import math

import torch

from model import shift_sigma


def flow_sigmas(steps, shift, sigma_max=0.999):
    return shift_sigma(torch.linspace(sigma_max, 0.0, steps + 1, dtype=torch.float64), shift)  # (steps+1,)


def guided_velocity(model, x, sigma, y, mask, y_null, mask_null, cfg):
    """One batched forward over [null, text]; guidance on every channel."""
    B = x.shape[0]
    t = torch.full((2 * B,), float(sigma) * 1000.0, device=x.device)
    v = model(torch.cat([x, x]), t, torch.cat([y_null, y]), torch.cat([mask_null, mask]))
    v_null, v_text = v.float().chunk(2)
    return v_null + cfg * (v_text - v_null)


@torch.no_grad()
def generate(model, y, mask, y_null, mask_null, noise, steps=20, cfg=4.5, shift=3.0, sampler="dpm++"):
    """Integrate from x = noise at sigma_max to sigma = 0. y (B, L, Dt), y_null (1 or B, L, Dt). -> x0 (B, C, H, W)."""
    if sampler not in ("euler", "dpm++"):
        raise ValueError(f"unknown sampler '{sampler}': use 'euler' or 'dpm++'")
    B = noise.shape[0]
    y_null, mask_null = y_null.expand(B, -1, -1), mask_null.expand(B, -1)
    sigmas = flow_sigmas(steps, shift).tolist()
    x, prev_x0, prev_h = noise.float(), None, None
    for i in range(steps):
        s, t = sigmas[i], sigmas[i + 1]
        v = guided_velocity(model, x.to(noise.dtype), s, y, mask, y_null, mask_null, cfg)
        if sampler == "euler":
            x = x + (t - s) * v
            continue
        x0 = x - s * v  # data prediction
        if t == 0.0:  # final step: alpha_t = 1, sigma_t = 0 -> the prediction itself
            x = x0
            continue
        h = math.log((1 - t) / t) - math.log((1 - s) / s)  # lambda_t - lambda_s
        D = x0 if prev_x0 is None else x0 + (x0 - prev_x0) * (h / prev_h) / 2  # 2nd order after step 1
        x = (t / s) * x + (1 - t) * (1 - math.exp(-h)) * D
        prev_x0, prev_h = x0, h
    return x
