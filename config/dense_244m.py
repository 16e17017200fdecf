# Dense pre-LN baseline matched to MoEUT-244M in parameters (spec §8)
model_type = 'dense'
d_model = 1024
n_layers = 18
n_heads = 16
d_head = 64
d_ff = 4110
import os
exec(open(os.path.join(os.path.dirname(__file__), 'paper_recipe.py')).read())   # spec §8
out_dir = 'out/dense_244m'
