# The laptop model on the shapes world: pixel space 32x32, 2 CPU cores, ~10 minutes.
out_dir = "out/shapes"
preset = "shapes"
batch_size = 64
max_steps = 100000
max_minutes = 10.0
lr = 1e-3
warmup_steps = 100
grad_clip = 1.0
flow_shift = 1.0
dtype = "float32"  # bf16 autocast on this 2-core CPU was ~15x slower for this model (depthwise conv)
log_every = 20
save_every = 500
eval_every = 1000
