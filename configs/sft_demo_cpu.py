# A tiny Qwen3-style model trained from scratch on the bundled demo conversations, on CPU in minutes.
#   make demo   (or: python train_sft.py configs/sft_demo_cpu.py)
out_dir = 'out-demo'
data_dir = 'data/demo/sft'        # built by the demo (prepare_sft.py --out_dir data/demo/sft)
init_from = 'scratch'
model_preset = 'tiny'

block_size = 256
packing = True
batch_size = 8
gradient_accumulation_steps = 1

learning_rate = 3e-3
min_lr = 3e-4
max_iters = 200
warmup_iters = 20
lr_decay_iters = 200
weight_decay = 0.01
grad_clip = 1.0
dropout = 0.0

eval_interval = 50
eval_iters = 8
log_interval = 10
keep_last_n = 2

device = 'cpu'
dtype = 'float32'
compile = False
