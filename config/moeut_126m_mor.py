# MoEUT-126M (spec/moeut.md §8 shape) with Mixture-of-Recursions expert-choice (Bae et al. 2025).
# $ python train.py config/moeut_126m_mor.py
# Default capacities (R-r)/R skip 44% of the token-steps at R = 9. Eval uses the causal threshold mode.
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

out_dir = 'out/moeut_126m_mor'
halting = 'mor'
mor_routing = 'expert'
mor_capacity = ()            # () = (R - r) / R
mor_gate = 'router'
mor_alpha = 1.0
mor_aux_coef = 0.001
mor_causal_eval = True
halt_kv = 'active-only'
