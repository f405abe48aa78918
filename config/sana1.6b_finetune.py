# Fine-tune SANA-1.6B (or SANA-1.5-1.6B) 1024px on your own captioned images.
# torchrun --nproc_per_node 8 train.py config/sana1.6b_finetune.py --init_from <SANA1.5_1.6B_1024px.pth> --data <folder>
out_dir = "out/sana1.6b_ft"
preset = "sana1.5-1.6b"
image_size = 1024
batch_size = 64
lr = 2e-5  # official SANA-1.5 fine-tuning lr
warmup_steps = 1000
grad_clip = 0.1
flow_shift = 3.0
optimizer = "came8bit"
grad_checkpointing = True
dtype = "auto"
max_steps = 10000
save_every = 1000
