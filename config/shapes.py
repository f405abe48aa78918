# The laptop model on the shapes world, short: 2000 steps on the tiny DC-AE's 8x8x4 latents (32x32 images).
# The baseline the growth and pruning experiments start from; config/shapes_shipped.py is the full recipe.
out_dir = "out/shapes"
preset = "shapes-c4"  # 6 blocks x 128, patch 2 (16 tokens), MiniLM captions; autoencoder weights/shapes_ae_c4.safetensors
batch_size = 64
max_steps = 2000  # steps, not minutes, so that the run is the same on every machine
lr = 5e-3  # possible with the bias correction below; without it 2e-3 (ABLATIONS.md)
came_bias_correction = True  # not in the paper: without it CAME sits on a loss plateau at the start (came8bit.py)
warmup_steps = 100
decay_steps = 600  # linear cool-down over the last 600 steps (official: constant lr)
grad_clip = 1.0
flow_shift = 1.0  # 16 tokens: no shift (SANA's 3.0 is for 1024px)
dtype = "float32"  # bf16 autocast on a 2-core CPU ran this model ~15x slower (depthwise conv)
log_every = 20
save_every = 500
eval_every = 1000
