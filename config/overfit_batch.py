# Debugging recipe: overfit ONE fixed batch. If the loss does not go to ~0 the model, the loss or the
# data slicing is broken (the decoded input/target pair printed at step 0 shows an off-by-one).
# python train.py config/overfit_batch.py
out_dir = 'out/overfit_batch'
dataset = 'shakespeare_bytes'
overfit_batch = True
batch_size = 4
block_size = 64
d_model = 128
n_layers = 4
group_size = 2
ff_n_experts = 16
ff_k = 4
d_expert = 32
learning_rate = 3e-3
min_lr = 3e-3
warmup_iters = 0
max_iters = 300
lr_decay_iters = 300
grad_clip = 0.0
weight_decay = 0.0
entropy_reg = 0.0                # the balancing loss fights memorising one batch
att_entropy_reg = 0.0
eval_interval = 100000           # no evals; just the training loss
eval_iters = 1
log_interval = 25
always_save_checkpoint = False
