"""
A tiny synthetic corpus where the work each position needs is known, to show that learned depth follows
difficulty (halting.py; config/addition_act.py). Raw bytes, one problem per document.

    python prepare.py --synthetic=addition      # -> data/addition: train.bin, val.bin, meta.json (bytes)

addition: two `digits`-digit numbers added column by column, least significant digit first, each column
written as its three digits a_i b_i s_i, then the final carry. 1270 + 95 = 1365:

    columns (a_i, b_i, s_i): 0 5 5 | 7 9 6 | 2 0 3 | 1 0 1 | carry 0   ->   "0557962031010"

So every sum digit comes two bytes after its operands, and its carry from the column before: a small
model learns it in a few hundred steps on a CPU (the textbook layout, whole numbers then the sum,
took far longer). Positions differ in what predicting the NEXT byte takes (a model's output at
position t is its guess of byte t + 1), which difficulty() labels:
    0  nothing to compute: the next byte is a random operand digit (no model beats 1/10) or the end
    1  the next byte is a sum digit (or the final carry) with no carry into it
    2  the same with a carry into it (the carry depends on the column before)
"""
import json
import os
import random

TASKS = ('addition',)


def addition_problem(rng: random.Random, digits: int) -> str:
    out, carry = [], 0
    for _ in range(digits):
        a, b = rng.randrange(10), rng.randrange(10)
        carry, s = divmod(a + b + carry, 10)
        out.append(f"{a}{b}{s}")
    return ''.join(out) + str(carry)


def difficulty(ids, digits: int = 4, eot: int = 256) -> list:
    """Per token of `ids` (byte ids of problems each followed by `eot`, as prepare.py writes them), the
    difficulty of predicting the token after it: 0, 1, 2 as in the module doc; -1 where it cannot be told
    (the problem started before ids did)."""
    labels = [-1] * len(ids)
    starts = [i + 1 for i, t in enumerate(ids) if t == eot]
    for s0 in starts:
        labels[s0 - 1] = 0                            # eot: the next byte is a random digit
        carry = 0
        for i in range(digits):
            p = s0 + 3 * i                            # a_i at p, b_i at p + 1, s_i at p + 2
            if p + 2 >= len(ids):
                return labels
            a, b = ids[p] - 48, ids[p + 1] - 48
            labels[p] = 0                             # predicts b_i: random
            labels[p + 1] = 2 if carry else 1         # predicts s_i
            carry = (a + b + carry) // 10
            labels[p + 2] = 0                         # predicts a_(i+1): random ...
        labels[s0 + 3 * digits - 1] = 2 if carry else 1   # ... or, after the last column, the final carry
        if s0 + 3 * digits < len(ids):
            labels[s0 + 3 * digits] = 0               # predicts the end of the problem
    return labels


def problems(task: str, n: int, seed: int, digits: int = 4) -> list:
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; have {', '.join(TASKS)}")
    rng = random.Random(seed)
    return [addition_problem(rng, digits) for _ in range(n)]


def token_stream(task: str, n: int, seed: int, digits: int = 4, eot: int = 256) -> list:
    """n problems as byte ids, each followed by eot: what prepare_synthetic's train.bin holds."""
    return [t for p in problems(task, n, seed, digits) for t in [*p.encode(), eot]]


def prepare_synthetic(task: str, out_dir=None, seed: int = 1337, n: int = 200_000, digits: int = 4,
                      val_fraction: float = 0.005, verbose: bool = True) -> dict:
    """Write `n` problems as documents (out_dir/problems.jsonl, kept as the dataset's source) and tokenize
    them with prepare.py's bytes tokenizer into out_dir (default data/<task>). Returns meta.json's dict."""
    import prepare
    if task not in TASKS:                             # before anything is written
        raise prepare.PrepareError(f"unknown synthetic task {task!r}; have {', '.join(TASKS)}")
    docs = problems(task, n, seed, digits)
    out_dir = out_dir or os.path.join('data', task)
    os.makedirs(out_dir, exist_ok=True)
    src = os.path.join(out_dir, 'problems.jsonl')
    tmp = f"{src}.{os.getpid()}.tmp"
    try:
        with open(tmp, 'w') as f:
            for d in docs:
                f.write(json.dumps({'text': d}) + '\n')
        os.replace(tmp, src)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return prepare.prepare([src], out_dir, 'bytes', val_fraction, seed, verbose=verbose)


def depth_by_difficulty(model, ids, block: int, digits: int = 4, eot: int = 256) -> dict:
    """{label: (mean depth, tokens)} of a halting model (or one with per-token exit) over the windows of
    `block` tokens of `ids`: the repeats each token ran, grouped by difficulty()."""
    import torch
    was = model.training
    model.eval()
    sums = {}
    with torch.no_grad():
        for s in range(0, len(ids) - block + 1, block):
            window = ids[s:s + block]
            model(torch.tensor(window)[None])
            depth = model.core.trace['depth'][0].tolist()
            for lab, d in zip(difficulty(window, digits, eot), depth):
                if lab >= 0:
                    tot, n = sums.get(lab, (0, 0))
                    sums[lab] = (tot + d, n + 1)
    model.train(was)
    return {lab: (tot / n, n) for lab, (tot, n) in sorted(sums.items())}
