# The paper's training recipe (spec §8), included by every moeut_* and dense_* config:
# context 1024, global batch 64, 100k steps, AdamW 2.5e-4 with betas (0.9, 0.999) and weight decay
# 0.01, 4000 warmup steps, cosine to 0.1*lr, grad clip 0.25, bf16 (train.py's GPU default), no dropout.
# The 44M configs override warmup (0) and clipping (0.1), as the paper did.
dataset = 'shakespeare'            # gpt2 tokens; point this at your own prepared corpus for real runs
block_size = 1024
total_batch_size = 64              # the paper's global batch: sequences per optimizer step, any world size
batch_size = 32                    # the largest micro-batch per GPU: 1 GPU accumulates 2 x 32, 2 GPUs 1 x 32, 8 GPUs 1 x 8
                                   # (H100, 126M compiled, vocab 8000: 234k tok/s at 32, 245k at 64, ~72k at 8)
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
