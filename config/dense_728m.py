# Dense pre-LN baseline matched to MoEUT-728M in parameters (spec §8)
model_type = 'dense'
d_model = 1280
n_layers = 36
n_heads = 20
d_head = 64
d_ff = 5120
import os
exec(open(os.path.join(os.path.dirname(__file__), 'paper_recipe.py')).read())   # spec §8
out_dir = 'out/dense_728m'
