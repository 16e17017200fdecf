# Dense pre-LN baseline matched to MoEUT-44M in parameters (spec §8)
model_type = 'dense'
d_model = 412
n_layers = 16
n_heads = 10
d_head = 41
d_ff = 2053
import os
exec(open(os.path.join(os.path.dirname(__file__), 'paper_recipe.py')).read())   # spec §8
out_dir = 'out/dense_44m'
warmup_iters = 0                   # the 44M runs had no warmup
grad_clip = 0.1
