# MoEUT-244M (paper config; 243.33M parameters at vocab 8000, spec §8)
# python model.py config/moeut_244m.py --vocab_size=8000   prints the counts
model_type = 'moeut'
d_model = 1024
n_layers = 18
group_size = 2
n_heads = 4
d_head = 128
att_n_experts = 10
att_k = 2
ff_n_experts = 387
ff_k = 16
d_expert = 128
entropy_reg = 0.01
att_entropy_reg = 0.001
import os
exec(open(os.path.join(os.path.dirname(__file__), 'paper_recipe.py')).read())   # spec §8
out_dir = 'out/moeut_244m'
