# MoEUT with Mixture-of-Recursions expert-choice routing (Bae et al. 2025) on Shakespeare, CPU-sized.
# $ python train.py config/shakespeare_mor.py
# Top-k over the sequence is not causal: eval and sampling use the causal threshold mode
# (mor_causal_eval), so the reported eval loss is the causal one.
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

out_dir = 'out/shakespeare_mor'
halting = 'mor'
mor_routing = 'expert'       # 'token': depth chosen once at entry (causal by construction)
mor_capacity = ()            # () = (R - r) / R of the tokens continue before step r
mor_gate = 'router'          # update scaled by mor_alpha · sigmoid(score)
mor_alpha = 1.0
mor_aux_coef = 0.001         # BCE: scores learn to predict top-k selection (used by the threshold mode)
mor_causal_eval = True
halt_kv = 'active-only'
