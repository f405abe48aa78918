# The shipped laptop model (weights/shapes.safetensors): config/shapes.py run 5800 steps, the first 1500 on
# colour-attribution prompts alone (a curriculum: colour binding learned first survives the full mix; ABLATIONS.md).
out_dir = "out/shapes_shipped"
preset = "shapes-c4"
batch_size = 64
max_steps = 5800
lr = 5e-3
came_bias_correction = True
warmup_steps = 100
decay_steps = 1800
curriculum_steps = 1500
curriculum_weights = "single_object=0,two_object=0,counting=0,colors=0,position=0,color_attr=1"
grad_clip = 1.0
flow_shift = 1.0
dtype = "float32"
log_every = 20
save_every = 500
eval_every = 1000
