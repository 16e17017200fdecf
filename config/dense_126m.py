# Dense pre-LN baseline matched to MoEUT-126M in parameters (spec §8)
model_type = 'dense'
d_model = 768
n_layers = 16
n_heads = 16
d_head = 48
d_ff = 3072
import os
exec(open(os.path.join(os.path.dirname(__file__), 'paper_recipe.py')).read())   # spec §8
out_dir = 'out/dense_126m'
