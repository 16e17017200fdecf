# MoEUT with Mixture-of-Recursions expert-choice routing (Bae et al. 2025) on Shakespeare, CPU-sized.
# $ python train.py config/shakespeare_mor.py
# Top-k over the sequence is not causal: eval and sampling use the causal threshold mode
# (mor_causal_eval), so the reported eval loss is the causal one.
import os
exec(open(os.path.join(os.path.dirname(__file__), 'shakespeare.py')).read())   # the base run, then:

out_dir = 'out/shakespeare_mor'
halting = 'mor'
mor_routing = 'expert'       # 'token': depth chosen once at entry (causal by construction)
mor_capacity = ()            # () = (R - r) / R of the tokens continue before step r
mor_gate = 'router'          # update scaled by mor_alpha · sigmoid(score)
mor_alpha = 1.0
mor_aux_coef = 0.001         # BCE: scores learn to predict top-k selection (used by the threshold mode)
mor_causal_eval = True
halt_kv = 'active-only'
