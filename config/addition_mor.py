# MoR expert-choice on the addition task of config/addition_act.py (same model, same data).
# $ python prepare.py --synthetic=addition && python train.py config/addition_mor.py
# Measured (README, "Depth follows difficulty"): with its fixed capacities MoR sends the random operand
# digits deepest, the opposite of ACT.
import os
exec(open(os.path.join(os.path.dirname(__file__), 'addition_act.py')).read())   # the ACT run, then:

out_dir = 'out/addition_mor'
halting = 'mor'
mor_routing = 'expert'            # capacities (R - r)/R of the tokens continue before step r
mor_causal_eval = True            # eval and sampling: sigmoid > 0.5 (causal)
