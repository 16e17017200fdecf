# MoEUT-126M (spec/moeut.md §8 shape) with Mixture-of-Recursions expert-choice (Bae et al. 2025).
# $ python train.py config/moeut_126m_mor.py
# Default capacities (R-r)/R skip 44% of the token-steps at R = 9. Eval uses the causal threshold mode.
# compile=True compiles the whole model as one graph (fixed counts per step, no host sync; docs/depth.md).
import os
exec(open(os.path.join(os.path.dirname(__file__), 'moeut_126m.py')).read())   # the base run, then:

out_dir = 'out/moeut_126m_mor'
halting = 'mor'
mor_routing = 'expert'
mor_capacity = ()            # () = (R - r) / R
mor_gate = 'router'
mor_alpha = 1.0
mor_aux_coef = 0.001
mor_causal_eval = True
halt_kv = 'active-only'
