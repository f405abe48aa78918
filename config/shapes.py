# The laptop model on the shapes world: DC-AE latents (8x8x4 from 32x32 images), 2000 steps (~10 min on 2 cores).
out_dir = "out/shapes"
preset = "shapes-c4"  # 6 blocks x 128, patch 2 on the tiny DC-AE's 8x8x4 latents (weights/shapes_ae_c4.safetensors);
# preset = "shapes" (8x8x16 latents) is sessions 1-5's model: 0.22 vs 0.32 after 2000 steps (README)
batch_size = 64
max_steps = 2000
max_minutes = 0.0  # steps, not minutes, so that the run is the same on every machine
lr = 5e-3  # with the bias correction below; without it 2e-3 (3e-3 stalled at the start): NOTES.md
came_bias_correction = True  # not in the paper: without it CAME sat on a loss plateau for ~250 steps (came8bit.py)
warmup_steps = 100
decay_steps = 600  # linear cool-down over the last 600 steps (official: constant); checker 0.26 vs 0.21 (NOTES.md)
grad_clip = 1.0
flow_shift = 1.0
dtype = "float32"  # bf16 autocast on this 2-core CPU was ~15x slower for this model (depthwise conv)
log_every = 20
save_every = 500
eval_every = 1000
