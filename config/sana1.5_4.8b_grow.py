# SANA-1.5 4.8B grown from SANA-1.6B (Sec. 2.2): keep its first 18 blocks, add 42 identity blocks -> 60.
# torchrun --nnodes 8 --nproc_per_node 8 train.py config/sana1.5_4.8b_grow.py --grow_from <Sana_1600M_1024px.pth> --data <folder>
out_dir = "out/sana1.5_4.8b"
preset = "sana1.5-4.8b"
depth = 60
grow_init = "partial"
grow_drop_last = 2
image_size = 1024
batch_size = 1024
lr = 1e-4  # pre-training lr (Sec. 3.1), then 2e-5 for SFT
warmup_steps = 2000
grad_clip = 0.1
flow_shift = 3.0
optimizer = "came8bit"
fsdp = True
grad_checkpointing = True
dtype = "auto"
max_steps = 100000
save_every = 1000
