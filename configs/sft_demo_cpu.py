# A tiny Qwen3-style model trained from scratch on the bundled demo conversations, on CPU in minutes.
#   make demo   (or, after make_demo_data.py and prepare_sft.py --tokenizer data/demo/tokenizer:
#                python train_sft.py configs/sft_demo_cpu.py)
# The data uses the demo's own 384-token tokenizer (data/make_demo_data.py writes it): with Qwen's
# 151,936-token vocabulary the embedding and LM head would be 98% of this model and most of its time.
out_dir = 'out-demo'
data_dir = 'data/demo/sft'        # built by the demo (prepare_sft.py --out_dir data/demo/sft)
init_from = 'scratch'
model_preset = 'tiny'             # Qwen3 layout: RMSNorm, RoPE, SwiGLU, QK-norm, GQA, tied embeddings
vocab_size = 384
n_layer = 4
n_embd = 128
n_head = 8
n_kv_head = 4
head_dim = 16
intermediate_size = 128           # 0.44M parameters in all (embedding included)

block_size = 256
packing = True
batch_size = 16                   # packed rows of 256 tokens (~7 conversations each) per step
gradient_accumulation_steps = 1

learning_rate = 3e-3
min_lr = 3e-4
max_iters = 400                   # ~7 epochs of the 3,800 training conversations
warmup_iters = 20
lr_decay_iters = 400
weight_decay = 0.01
grad_clip = 1.0
dropout = 0.0

eval_interval = 100
eval_iters = 8
log_interval = 10
keep_last_n = 2
# greedy replies to the 300 held-out conversations every 50 steps, scored like eval_sft.py:
# the accuracy curve of the demo's plot (3.0% of the run's wall time, measured on a 2-core CPU)
gen_eval_data = 'data/demo/test.jsonl'
gen_eval_interval = 50
gen_eval_max_new_tokens = 32

device = 'cpu'
dtype = 'float32'
compile = False
