"""Weighted mixtures of prepared datasets (dataset='a:0.7,b:0.3', data.Mixture): one-line errors for a bad
spec, a missing dataset and mixed tokenizers; proportions, determinism, resume and the split over ranks
at the batch level; exact resume, per-dataset val losses and the start lines through train.py."""
import contextlib
import io
import json
import os
import random
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import Mixture, is_mixture, parse_dataset  # noqa: E402
from test_train import load, log, make_data, one_line, train_here  # noqa: E402


def write_dataset(data_dir, train, val, tokenizer='bytes', vocab_size=257, dtype='uint16'):
    """A dataset as prepare.py lays it out: train.bin / val.bin of the given tokens + meta.json."""
    os.makedirs(data_dir, exist_ok=True)
    for split, toks in (('train', train), ('val', val)):
        np.asarray(toks, dtype=dtype).tofile(os.path.join(data_dir, f'{split}.bin'))
    with open(os.path.join(data_dir, 'meta.json'), 'w') as f:
        json.dump({'tokenizer': tokenizer, 'vocab_size': vocab_size, 'dtype': dtype,
                   'train_tokens': len(train), 'val_tokens': len(val)}, f)


# ---- the spec ----------------------------------------------------------------------------------

def test_weights_are_normalised_and_a_plain_name_is_one_dataset():
    mix = parse_dataset(' fineweb : 7, code:3 ')
    assert [n for n, _ in mix] == ['fineweb', 'code']
    assert [w for _, w in mix] == pytest.approx([0.7, 0.3], rel=1e-12)
    assert parse_dataset('shakespeare_bytes') == [('shakespeare_bytes', 1.0)]
    assert not is_mixture('shakespeare_bytes') and is_mixture('a:1')


@pytest.mark.parametrize('spec, needle', [
    ('a:0.7,b', "'b' is not name:weight"),
    ('a:0.7,,b:1', "'' is not name:weight"),
    (':1,b:1', "':1' is not name:weight"),
    ('a:x,b:1', "weight of 'a' is 'x', not a number"),
    ('a:0,b:1', "weight of 'a' is 0.0: weights must be positive"),
    ('a:1,b:-2', "weight of 'b' is -2.0: weights must be positive"),
    ('a:nan,b:1', "weights must be positive"),
    ('a:inf,b:1', "weights must be positive"),
    ('a:1,a:2', "'a' is listed twice"),
    ('loss:1,b:1', "cannot be named 'loss'"),
])
def test_bad_spec_is_one_line(spec, needle):
    with pytest.raises(SystemExit) as e:
        parse_dataset(spec)
    one_line(e.value.code, f"dataset={spec!r}", needle)


# ---- datasets on disk ---------------------------------------------------------------------------

def words_text(seed):
    rng = random.Random(seed)
    words = 'fn let x = y + 1 ; return if else while { } ( ) def class import self'.split()
    return '\n'.join(' '.join(rng.choice(words) for _ in range(10)) for _ in range(1500))


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    """data/tiny (a Shakespeare slice) and data/words (made-up code), both bytes; data/gpt2 has another
    tokenizer."""
    import prepare
    r = str(tmp_path_factory.mktemp('mix'))
    make_data(r)
    src = os.path.join(r, 'words.txt')
    with open(src, 'w') as f:
        f.write(words_text(0))
    prepare.prepare([src], os.path.join(r, 'data', 'words'), 'bytes', 0.1, 1337, verbose=False)
    write_dataset(os.path.join(r, 'data', 'gpt2'), np.arange(4000) % 50000, np.arange(400), 'gpt2', 50257)
    write_dataset(os.path.join(r, 'data', 'wide'), np.arange(4000) % 257, np.arange(400) % 257, dtype='uint32')
    return r


def test_missing_dataset_of_a_mixture_is_one_line(root):
    with pytest.raises(SystemExit) as e:
        train_here(root, '--dataset=tiny:1,nope:1', '--out_dir=missing')
    one_line(e.value.code, 'missing data/nope/meta.json', 'prepare.py', "dataset='tiny:1,nope:1'")
    with pytest.raises(SystemExit) as e:      # the spec is checked in train.py too, before anything runs
        train_here(root, '--dataset=tiny:1,words', '--out_dir=badspec')
    one_line(e.value.code, "'words' is not name:weight")
    assert not os.path.exists(os.path.join(root, 'missing')) and not os.path.exists(os.path.join(root, 'badspec'))


@pytest.mark.parametrize('other, said', [('gpt2', 'data/gpt2 has gpt2 (vocab_size 50257, uint16)'),
                                         ('wide', 'data/wide has bytes (vocab_size 257, uint32)')])
def test_mixed_tokenizers_are_one_line(root, other, said):
    with pytest.raises(SystemExit) as e:
        train_here(root, f'--dataset=tiny:0.5,{other}:0.5', f'--out_dir=mixed_{other}')
    one_line(e.value.code, 'mixes tokenizers', 'data/tiny has bytes (vocab_size 257, uint16)', said)


# ---- batches ------------------------------------------------------------------------------------

BLOCK = 4
BASES, N_WIN = (0, 100, 200), (40, 30, 20)


@pytest.fixture(scope='module')
def marked(tmp_path_factory):
    """Three sources whose windows are marked: every token of window w of source i is BASES[i] + w."""
    r = tmp_path_factory.mktemp('marked')
    paths = []
    for i, (base, n) in enumerate(zip(BASES, N_WIN)):
        d = str(r / f's{i}')
        write_dataset(d, np.append(np.repeat(base + np.arange(n), BLOCK), 0), np.zeros(BLOCK + 1))
        paths.append(os.path.join(d, 'train.bin'))
    return paths


def mixture(paths, weights, micro, accum, rank=0, world=1, seed=1337):
    return Mixture([(f's{i}', p, w) for i, (p, w) in enumerate(zip(paths, weights))], BLOCK, micro, accum,
                   rank, world, seed)


def ids(step_batches):
    """The window marks of one step's micro-batches, in order (and a check that each window is whole)."""
    x = torch.cat([x for x, _ in step_batches])
    assert torch.equal(x, x[:, :1].expand_as(x))
    return x[:, 0].tolist()


def source(mark):
    return max(i for i, b in enumerate(BASES) if mark >= b)


def test_proportions_follow_the_weights_at_every_step(marked):
    """Over 300 steps of 10 windows, each source's count stays within 1.5 windows of its exact share
    (independent draws would stray by ~20); each source visits each of its windows once an epoch, in a
    new order each epoch; both micro-batches get every source."""
    w, g = (0.6, 0.3, 0.1), 10
    b = mixture(marked, w, 5, 2)
    counts, streams, where = np.zeros(3), [[], [], []], np.zeros((3, 2))
    for step in range(1, 301):
        batch = b.next_step()
        marks = ids(batch)
        for j, m in enumerate(marks):
            counts[source(m)] += 1
            streams[source(m)].append(m - BASES[source(m)])
            where[source(m), j // 5] += 1
        assert np.abs(counts - step * g * np.array(w)).max() <= 1.5, (step, counts)
    assert b.taken == counts.tolist() and b.pos == 300
    for i, n in enumerate(N_WIN):      # every window E or E+1 times after E whole epochs and a part
        seen = np.bincount(streams[i], minlength=n)
        assert seen.min() == len(streams[i]) // n and seen.max() - seen.min() <= 1, seen
        # a source's stream, in its own order: each epoch a new permutation of its windows
        e0, e1 = (b._starts(np.full(n, i), np.arange(e * n, (e + 1) * n)) // BLOCK for e in (0, 1))
        assert sorted(e0) == sorted(e1) == list(range(n)) and list(e0) != list(e1)
    assert (where > 0.3 * where.sum(1, keepdims=True)).all(), where   # about half each


def test_every_rank_gets_every_source(marked):
    """The windows of a step are shuffled before the ranks take their slices: in the order drawn, two
    sources of weight 0.5 alternate, and with one window per rank rank 0 would only ever see the first."""
    ranks = [mixture(marked[:2], (0.5, 0.5), 1, 1, r, 2) for r in range(2)]
    seen = np.zeros((2, 2))
    for _ in range(100):
        for r, b in enumerate(ranks):
            seen[r, source(ids(b.next_step())[0])] += 1
    assert (seen > 25).all(), seen


def test_the_same_seed_gives_the_same_batches(marked):
    def run(seed):
        b = mixture(marked, (0.5, 0.3, 0.2), 4, 2, seed=seed)
        return [ids(b.next_step()) for _ in range(20)]
    a = run(1337)
    assert run(1337) == a
    assert run(7) != a
    # a source's own stream does not depend on where it is listed or what it is mixed with
    b = Mixture([('s1', marked[1], 0.5), ('s0', marked[0], 0.5)], BLOCK, 4, 2, 0, 1, 1337)
    c = Mixture([('s0', marked[0], 0.9), ('s1', marked[1], 0.1)], BLOCK, 4, 2, 0, 1, 1337)
    n = 3 * N_WIN[0]
    assert list(b._starts(np.full(n, 1), np.arange(n))) == list(c._starts(np.full(n, 0), np.arange(n)))


@pytest.mark.parametrize('world, micro, accum', [(2, 2, 2), (4, 1, 2), (4, 2, 1)])
def test_ranks_split_the_one_process_batch_and_resume_at_another_world_size(marked, world, micro, accum):
    """Global batch 8: rank r's micro-batches are its disjoint slices of the global batch (positions
    accum x world x micro), and together they are the one-process batch. A state saved by one process
    after 3 steps resumes on `world` ranks with the same global batches."""
    w = (0.5, 0.3, 0.2)
    one = mixture(marked, w, 8, 1)
    want = [ids(one.next_step()) for _ in range(6)]
    ranks = [mixture(marked, w, micro, accum, r, world) for r in range(world)]
    for step in range(6):
        if step == 3:
            saved = mixture(marked, w, 8, 1)
            for _ in range(3):
                saved.next_step()
            for r in ranks:
                r.load_state(saved.state(), 'ckpt')
        got = [[b[0][:, 0].tolist() for b in r.next_step()] for r in ranks]   # [rank][micro-step] marks
        glob = [got[r][a][m] for a in range(accum) for r in range(world) for m in range(micro)]
        assert glob == want[step]
        if step == 0:               # no source wraps an epoch in the first step: every window differs
            assert len(set(glob)) == len(glob)


def test_a_resumed_mixture_continues_exactly(marked):
    w = (0.6, 0.3, 0.1)
    a = mixture(marked, w, 4, 1)
    want = [ids(a.next_step()) for _ in range(40)]
    for at in (14, 17):     # at 14 the sources' counts (33, 17, 6) are not the rounded shares (34, 17, 6)
        b = mixture(marked, w, 4, 1)
        for _ in range(at):
            b.next_step()
        state = b.state()
        assert state['data_pos'] == at and sum(state['data_sources'].values()) == at * 4
        c = mixture(marked, w, 4, 1)
        c.load_state(state, 'ckpt')
        assert [ids(c.next_step()) for _ in range(40 - at)] == want[at:]


# ---- train.py ----------------------------------------------------------------------------------

MIX = ['--dataset=tiny:0.7,words:0.3', '--eval_interval=2', '--dropout=0.1']


def train_quiet(root, *args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train_here(root, *args)
    return out.getvalue()


def eval_records(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [r for r in map(json.loads, f) if 'val/loss' in r]


@pytest.fixture(scope='module')
def mix_a(root):
    """6 iterations on a 0.7/0.3 mixture in one go, dropout on."""
    said = train_quiet(root, *MIX, '--max_iters=6', '--out_dir=mix_a')
    return os.path.join(root, 'mix_a'), said


def test_resume_through_train_py_is_exact(root, mix_a):
    """3 iterations, then resumed to 6: the same losses (train and each dataset's val), the same data
    position of each dataset and the same weights as the uninterrupted run."""
    a_out, _ = mix_a
    train_quiet(root, *MIX, '--max_iters=3', '--out_dir=mix_b')
    said = train_quiet(root, *MIX, '--max_iters=6', '--out_dir=mix_b', '--init_from=resume')
    assert 'resumed from' in said and 'at iter 3' in said
    b_out = os.path.join(root, 'mix_b')
    a, b = log(a_out), log(b_out)
    assert [r['iter'] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert rb['train/loss'] == pytest.approx(ra['train/loss'], abs=1e-6), (ra, rb)
    ea, eb = eval_records(a_out), eval_records(b_out)
    assert [r['iter'] for r in eb] == [0, 2, 3, 4, 6]    # 3: the first run's last iteration
    ea = {r['iter']: r for r in ea}
    for r in eb:
        if r['iter'] in ea:
            for k in ('val/loss', 'val/tiny', 'val/words'):
                assert r[k] == pytest.approx(ea[r['iter']][k], abs=1e-6), (k, r)
    ca, cb = load(os.path.join(a_out, 'ckpt_0000006.pt')), load(os.path.join(b_out, 'ckpt_0000006.pt'))
    assert ca['data_pos'] == cb['data_pos'] == 6
    assert ca['data_sources'] == cb['data_sources']
    assert sum(ca['data_sources'].values()) == 6 * 4         # TINY's global batch: 4 windows
    assert ca['data_sources'] == {'tiny': 17, 'words': 7}    # the 0.7 / 0.3 weights, not an even split
    for k, v in ca['model'].items():
        torch.testing.assert_close(cb['model'][k], v, rtol=0, atol=1e-6)


def test_val_is_the_weighted_mix_of_the_datasets_and_the_start_says_the_mixture(mix_a):
    out, said = mix_a
    recs = eval_records(out)
    assert [r['iter'] for r in recs] == [0, 2, 4, 6]
    for r in recs:
        assert r['val/loss'] == pytest.approx(0.7 * r['val/tiny'] + 0.3 * r['val/words'], rel=1e-9)
    assert abs(recs[-1]['val/tiny'] - recs[-1]['val/words']) > 0.05      # two different datasets
    evals = [ln for ln in said.splitlines() if ln.startswith('eval 6:')]
    assert evals and ', val/tiny ' in evals[0] and ', val/words ' in evals[0]
    tiny, words = (json.load(open(os.path.join(os.path.dirname(out), 'data', n, 'meta.json'))) for n in ('tiny', 'words'))
    assert 'a mixture of 2 datasets' in said
    for d, w, m in (('data/tiny', 0.7, tiny), ('data/words', 0.3, words)):
        line = next(ln for ln in said.splitlines() if ln.strip().startswith(f'{d}:'))
        assert f'weight {w}' in line and f"{m['train_tokens']:,} train" in line, line


def test_resume_with_another_mixture_is_one_line(root, mix_a):
    with pytest.raises(SystemExit) as e:
        train_quiet(root, *MIX[1:], '--dataset=tiny:0.5,words:0.5', '--max_iters=8', '--out_dir=mix_a',
                    '--init_from=resume')
    one_line(e.value.code, "dataset='tiny:0.7,words:0.3'", "'tiny:0.5,words:0.5'")


def test_a_plain_dataset_keeps_its_checkpoint_format(root):
    out = train_here(root, '--max_iters=1', '--eval_interval=1', '--eval_iters=1', '--out_dir=plain')
    ck = load(os.path.join(out, 'ckpt_0000001.pt'))
    assert ck['data_pos'] == 1 and 'data_sources' not in ck
    assert not any(k.startswith('val/') and k != 'val/loss' for r in eval_records(out) for k in r)
