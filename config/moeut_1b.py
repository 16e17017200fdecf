# MoEUT-1B (paper config; 1040.32M parameters at vocab 8000, spec §8)
# python model.py config/moeut_1b.py --vocab_size=8000   prints the counts
model_type = 'moeut'
d_model = 1536
n_layers = 36
group_size = 4
n_heads = 6
d_head = 128
att_n_experts = 12
att_k = 2
ff_n_experts = 565
ff_k = 24
d_expert = 128
entropy_reg = 0.01
att_entropy_reg = 0.001
# paper training recipe (spec §8): context 1024, global batch 64, 100k steps, AdamW 2.5e-4,
# betas (0.9, 0.999), wd 0.01, warmup 4000, cosine to 0.1*lr, clip 0.25, bf16
out_dir = 'out/moeut_1b'
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
