# The paper's training recipe (spec §8), included by every moeut_* and dense_* config:
# context 1024, global batch 64, 100k steps, AdamW 2.5e-4 with betas (0.9, 0.999) and weight decay
# 0.01, 4000 warmup steps, cosine to 0.1*lr, grad clip 0.25, bf16 (train.py's GPU default), no dropout.
# The 44M configs override warmup (0) and clipping (0.1), as the paper did.
dataset = 'shakespeare'            # gpt2 tokens; point this at your own prepared corpus for real runs
block_size = 1024
batch_size = 8                     # per GPU; 8 x 8 accumulation = 64 sequences per step at any world size
gradient_accumulation_steps = 8
max_iters = 100000
lr_decay_iters = 100000
learning_rate = 2.5e-4
min_lr = 2.5e-5
warmup_iters = 4000
beta1 = 0.9
beta2 = 0.999
weight_decay = 0.01
grad_clip = 0.25
dropout = 0.0
eval_interval = 1000
eval_iters = 50
log_interval = 50
compile = True                     # MoEUT-126M trains at 1.46x its eager speed compiled (README); --compile=False to debug
