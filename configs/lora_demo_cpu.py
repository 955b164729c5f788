# LoRA on the demo, layered over the demo's config (`make demo-lora` runs it, with a QLoRA twin):
#   python train_sft.py configs/sft_demo_cpu.py configs/lora_demo_cpu.py [--finetune=qlora --out_dir=...]
# The demo's model starts random, and a LoRA of a random frozen base learns little, so the base here
# is the demo model after 30 steps of full fine-tuning (val loss 1.78, 79% of replies end with
# <|im_end|>, 3% correct): a weak but trained base. The adapters then train for the demo's
# remaining 370 steps, next to full fine-tuning of the same base for the same steps.
init_from = 'out-demo-lora/base/ckpt.pt'
out_dir = 'out-demo-lora/lora'
finetune = 'lora'                 # 'qlora': the frozen projections in 4-bit NF4 (torchao)
lora_rank = 16
lora_alpha = 32.0
# q, k, v, o, gate, up, down of every layer, and the (tied) embedding / LM head in full (49K weights
# here; PEFT's modules_to_save): the weak base's embeddings need it. Measured on the same base and
# steps: projections alone reach val loss 1.12 and 31% correct; with the embedding 0.21 and 67%.
lora_targets = 'all,embed_tokens'
learning_rate = 1e-2              # adapters take a larger step than full fine-tuning (3e-3)
min_lr = 1e-3
max_iters = 370
lr_decay_iters = 370
