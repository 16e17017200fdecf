# MoEUT-44M (paper config; 44.35M parameters at vocab 8000, spec §8)
# python model.py config/moeut_44m.py --vocab_size=8000   prints the counts
# d_head 82 -> n_rot 40 (spec §5; the official profile crashes on 41)
model_type = 'moeut'
d_model = 412
n_layers = 16
group_size = 2
n_heads = 4
d_head = 82
att_n_experts = 8
att_k = 2
ff_n_experts = 155
ff_k = 12
d_expert = 128
entropy_reg = 0.01
att_entropy_reg = 0.001
import os
exec(open(os.path.join(os.path.dirname(__file__), 'paper_recipe.py')).read())   # spec §8
out_dir = 'out/moeut_44m'
warmup_iters = 0                   # the 44M runs had no warmup
grad_clip = 0.1
