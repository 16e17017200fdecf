# MoEUT-126M (paper Table 8 shape, spec/moeut.md §8) with ACT halting (Graves 2016); see halting.py.
# $ python train.py config/moeut_126m_act.py
# Note: with halting, n_layers counts the looped part only (n_prelude / n_coda layers come on top).
import os
exec(open(os.path.join(os.path.dirname(__file__), 'moeut_126m.py')).read())   # the base run, then:

out_dir = 'out/moeut_126m_act'
halting = 'act'
halt_kv = 'active-only'
halt_output = 'auto'         # Σ p_n · state_n
act_tau = 0.01
act_bias_init = -3.0         # h = 0.047 at init: every token runs all 9 steps at first
