# MoEUT-727M (paper config; 727.42M parameters at vocab 8000, spec §8)
# python model.py config/moeut_727m.py --vocab_size=8000   prints the counts
# d_model 1280: the official profile wrongly has 1024 (spec §8)
model_type = 'moeut'
d_model = 1280
n_layers = 36
group_size = 4
n_heads = 5
d_head = 128
att_n_experts = 13
att_k = 2
ff_n_experts = 467
ff_k = 20
d_expert = 128
entropy_reg = 0.01
att_entropy_reg = 0.001
import os
exec(open(os.path.join(os.path.dirname(__file__), 'paper_recipe.py')).read())   # spec §8
out_dir = 'out/moeut_727m'
