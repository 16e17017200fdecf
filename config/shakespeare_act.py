# MoEUT with ACT halting (Graves 2016) on Shakespeare, tiny enough for a CPU; see halting.py.
# $ python train.py config/shakespeare_act.py
# Everything else (data, batch, shape) comes from the plain tiny run, config/shakespeare.py.
import os
if os.path.exists('config/shakespeare.py'):
    exec(open('config/shakespeare.py').read())
else:  # until config/shakespeare.py exists: its tiny shape
    d_model = 128
    n_layers = 4
    group_size = 2
    n_heads = 4
    d_head = 32
    att_n_experts = 4
    att_k = 2
    ff_n_experts = 16
    ff_k = 4
    d_expert = 32
    block_size = 256

out_dir = 'out/shakespeare_act'
halting = 'act'
halt_kv = 'active-only'      # deeper steps attend only to tokens still running ('last-kv': frozen K/V)
halt_output = 'auto'         # ACT: Σ p_n · state_n
act_tau = 0.01               # ponder cost τ·mean(N + R)
act_bias_init = -3.0         # start deep; the ponder cost teaches tokens to stop
