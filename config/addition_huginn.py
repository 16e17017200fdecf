# The plain loop trained Huginn's way on the addition task (synthetic.py): depth drawn per step from a
# log-normal Poisson with mean 4, gradient through the last 3 repeats only, the input re-injected by an
# adapter before every repeat, random initial state. No halting unit: at inference, per-token exit.
# $ python prepare.py --synthetic=addition && python train.py config/addition_huginn.py
# then: python bench.py --what=depth_curve --device=cpu --depth_ckpt=out/addition_huginn --depth_exit=1e-3
import os
exec(open(os.path.join(os.path.dirname(__file__), 'addition_act.py')).read())   # the ACT run's model, then:

out_dir = 'out/addition_huginn'
halting = 'none'
n_layers = 4                      # R = 4: the mean depth, and the depth evaluated at
recurrence = 'random'
mean_repeats = 4.0
backprop_repeats = 3
input_injection = 'concat'
random_init_state = True
max_iters = 3000
lr_decay_iters = 3000
