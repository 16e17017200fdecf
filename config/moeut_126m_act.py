# MoEUT-126M (paper Table 8 shape, spec/moeut.md §8) with ACT halting (Graves 2016); see halting.py.
# $ python train.py config/moeut_126m_act.py
# Note: with halting, n_layers counts the looped part only (n_prelude / n_coda layers come on top).
import os
if os.path.exists('config/moeut_126m.py'):
    exec(open('config/moeut_126m.py').read())
else:  # until config/moeut_126m.py exists: the paper shape
    d_model = 768
    n_layers = 18
    group_size = 2
    n_heads = 4
    d_head = 96
    att_n_experts = 10
    att_k = 2
    ff_n_experts = 254
    ff_k = 12
    d_expert = 128
    block_size = 1024

out_dir = 'out/moeut_126m_act'
halting = 'act'
halt_kv = 'active-only'
halt_output = 'auto'         # Σ p_n · state_n
act_tau = 0.01
act_bias_init = -3.0         # h = 0.047 at init: every token runs all 9 steps at first
