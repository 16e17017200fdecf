# Depth follows difficulty: ACT on column-by-column addition (synthetic.py), sized for a 2-core CPU.
# $ python prepare.py --synthetic=addition && python train.py config/addition_act.py
# then: python bench.py --what=depth_curve --device=cpu --depth_ckpt=out/addition_act
# Sum digits (more so with a carry into them) should get more repeats than random operand digits.
out_dir = 'out/addition_act'
dataset = 'addition'              # bytes tokens; problems like "0557962031010" (see synthetic.py)
batch_size = 32
block_size = 64
model_type = 'moeut'
d_model = 64
n_layers = 6                      # G = 1 shared layer, up to R = 6 repeats
group_size = 1
n_heads = 4
d_head = 16
att_n_experts = 2
att_k = 1
ff_n_experts = 8
ff_k = 2
d_expert = 32
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 30
max_iters = 1000
lr_decay_iters = 1000
beta2 = 0.99
eval_interval = 250
eval_iters = 20
log_interval = 50
halting = 'act'
act_tau = 0.003                   # ponder cost τ·mean(N + R); at 0.01 depth collapsed to 2 everywhere
act_bias_init = -4.0              # before the model had learnt to add (so nothing deeper paid off yet)
