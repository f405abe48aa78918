# The shipped recipe (config/shapes_shipped.py) cut to 4000 steps: about 8 minutes on 2 CPU cores at 8.5 steps/s.
out_dir = "out/shapes10"
preset = "shapes-c4"
batch_size = 64
max_steps = 4000
lr = 5e-3
came_bias_correction = True
warmup_steps = 100
decay_steps = 1200  # the shipped run's 1800 of 5800, scaled
curriculum_steps = 1000  # the shipped run's 1500 of 5800, scaled: colour attribution alone first
curriculum_weights = "single_object=0,two_object=0,counting=0,colors=0,position=0,color_attr=1"
grad_clip = 1.0
flow_shift = 1.0
dtype = "float32"
log_every = 20
save_every = 500
eval_every = 2000  # the checker on the eval prompts mid-run and at the end (not counted in the training clock)
