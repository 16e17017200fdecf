# MoEUT-1B (paper config; 1040.32M parameters at vocab 8000, spec §8)
# python model.py config/moeut_1b.py --vocab_size=8000   prints the counts
model_type = 'moeut'
d_model = 1536
n_layers = 36
group_size = 4
n_heads = 6
d_head = 128
att_n_experts = 12
att_k = 2
ff_n_experts = 565
ff_k = 24
d_expert = 128
entropy_reg = 0.01
att_entropy_reg = 0.001
import os
exec(open(os.path.join(os.path.dirname(__file__), 'paper_recipe.py')).read())   # spec §8
out_dir = 'out/moeut_1b'
# micro-batch 32 (paper_recipe) needs 92.4 GiB at vocab 8000; on an 80 GB GPU add
# --activation_checkpointing=True: 71.5 GiB for 0.76x the tokens/s (H200, eager, 2026-12-06, README)
