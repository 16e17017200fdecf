# MoEUT with ACT halting (Graves 2016) on Shakespeare, tiny enough for a CPU; see halting.py.
# $ python train.py config/shakespeare_act.py
# Everything else (data, batch, shape) comes from the plain tiny run, config/shakespeare.py.
import os
exec(open(os.path.join(os.path.dirname(__file__), 'shakespeare.py')).read())   # the base run, then:

out_dir = 'out/shakespeare_act'
halting = 'act'
halt_kv = 'active-only'      # deeper steps attend only to tokens still running ('last-kv': frozen K/V)
halt_output = 'auto'         # ACT: Σ p_n · state_n
act_tau = 0.01               # ponder cost τ·mean(N + R)
act_bias_init = -3.0         # start deep; the ponder cost teaches tokens to stop
