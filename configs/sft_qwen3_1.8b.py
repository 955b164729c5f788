# Full fine-tuning of Qwen3-1.7B (the "1.8B" of the original SFT recipe) on 8 GPUs.
#   torchrun --standalone --nproc_per_node=8 train_sft.py configs/sft_qwen3_1.8b.py
# Global batch = 4 rows x 4 accumulation steps x 8 GPUs = 128 sequences per optimizer step.
out_dir = 'out-qwen3-1.8b-sft'
eval_interval = 200
eval_iters = 40
log_interval = 10
keep_last_n = 3                   # each step checkpoint is ~20 GB (fp32 weights + AdamW state)

# A local Hugging Face directory (config.json + *.safetensors) of the base model, e.g. from
# `huggingface-cli download Qwen/Qwen3-1.7B-Base --local-dir /path/to/Qwen3-1.7B`.
# Training never downloads anything. Or a ConfigurableGPT .pt checkpoint path, or 'resume'.
init_from = 'hf:/path/to/Qwen3-1.7B'

data_dir = 'data/my_sft'          # python prepare_sft.py --input my.jsonl --out_dir data/my_sft
block_size = 2048
packing = False

batch_size = 4
gradient_accumulation_steps = 4
learning_rate = 2e-5
min_lr = 2e-6
max_iters = 3000                  # ~3 epochs over 50K examples at 128 per step
warmup_iters = 100
lr_decay_iters = 3000
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
dropout = 0.05

dtype = 'bfloat16'
compile = True
