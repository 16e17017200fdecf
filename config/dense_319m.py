# Dense pre-LN baseline matched to MoEUT-319M in parameters (spec §8)
model_type = 'dense'
d_model = 1024
n_layers = 24
n_heads = 16
d_head = 64
d_ff = 4110
# paper training recipe (spec §8): context 1024, global batch 64, 100k steps, AdamW 2.5e-4,
# betas (0.9, 0.999), wd 0.01, warmup 4000, cosine to 0.1*lr, clip 0.25, bf16
out_dir = 'out/dense_319m'
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
