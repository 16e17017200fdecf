import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # so plain `pytest` works too, not only `python -m pytest` from the repo root
from configurator import ConfigError, apply_overrides, config_keys, configure, usage  # noqa: E402


def make_config():
    # looks like a script's globals(): config values plus things that must not be settable
    return dict(learning_rate=6e-4, max_iters=100, compile=True, out_dir='out', init_from='scratch',
                seed=None, betas=(0.9, 0.95), math=math, helper=lambda: 0, _private=1, __name__='__main__',
                TABLE={'a': 1})


def write(tmp_path, text, name='cfg.py'):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error(argv, config=None):
    """The ConfigError message for argv, checked to be a single line."""
    with pytest.raises(ConfigError) as e:
        apply_overrides(make_config() if config is None else config, argv)
    msg = str(e.value)
    assert '\n' not in msg
    return msg


# ----------------------------------------------------------------------------- happy paths

def test_config_keys_skips_modules_functions_and_private():
    assert config_keys(make_config()) == ['learning_rate', 'max_iters', 'compile', 'out_dir', 'init_from',
                                          'seed', 'betas']


def test_key_value_literal_and_return_value():
    c = make_config()
    assert apply_overrides(c, ['--max_iters=5', '--learning_rate=1e-3']) == {'max_iters': 5, 'learning_rate': 1e-3}
    assert c['max_iters'] == 5 and c['learning_rate'] == 1e-3


def test_int_for_float_becomes_float():
    c = make_config()
    apply_overrides(c, ['--learning_rate=1'])
    assert c['learning_rate'] == 1.0 and type(c['learning_rate']) is float


def test_string_fallback_and_equals_in_value():
    c = make_config()
    apply_overrides(c, ['--out_dir=out/run1', '--init_from=resume'])
    assert c['out_dir'] == 'out/run1' and c['init_from'] == 'resume'
    apply_overrides(c, ['--init_from=a=b'])
    assert c['init_from'] == 'a=b'


def test_str_key_keeps_raw_text_of_numbers():
    c = make_config()
    apply_overrides(c, ['--out_dir=123', "--init_from='quoted'"])
    assert c['out_dir'] == '123' and c['init_from'] == 'quoted'


@pytest.mark.parametrize('raw', ['1e3', '0x10', '1_000', '1.50', '007', '-0'])
def test_str_key_keeps_the_exact_text_of_number_like_values(raw):
    # the directory named '1e3' is not '1000.0', '0x10' is not '16' and '1_000' is not '1000'
    c = make_config()
    apply_overrides(c, [f'--out_dir={raw}'])
    assert c['out_dir'] == raw


def test_none_default_accepts_anything():
    c = make_config()
    apply_overrides(c, ['--seed=1337'])
    assert c['seed'] == 1337
    for arg, value in [('--seed=abc', 'abc'), ('--seed=[1,2]', [1, 2]), ('--seed=None', None)]:
        c = make_config()
        apply_overrides(c, [arg])
        assert c['seed'] == value


@pytest.mark.parametrize('arg, expected', [('--compile=False', False), ('--compile=false', False),
                                           ('--compile=0', False), ('--compile=TRUE', True), ('--compile=1', True)])
def test_bool_spellings(arg, expected):
    c = make_config()
    c['compile'] = not expected
    apply_overrides(c, [arg])
    assert c['compile'] is expected


def test_tuple_default_accepts_list():
    c = make_config()
    apply_overrides(c, ['--betas=[0.8,0.99]'])
    assert c['betas'] == (0.8, 0.99) and type(c['betas']) is tuple


def test_config_file_reads_and_modifies_existing_values(tmp_path):
    c = make_config()
    path = write(tmp_path, 'import math\nlearning_rate = learning_rate / 2\nmax_iters = int(math.sqrt(max_iters))\n'
                           'def helper():\n    pass\n_tmp = 3\n')
    assert apply_overrides(c, [path]) == {'learning_rate': 3e-4, 'max_iters': 10}
    assert c['helper']() == 0 and c['_private'] == 1  # the file's helper/_tmp did not leak into config


def test_order_file_then_key_value_wins(tmp_path):
    path = write(tmp_path, 'max_iters = 7\nout_dir = "from_file"\n')
    c = make_config()
    apply_overrides(c, [path, '--max_iters=9'])
    assert c['max_iters'] == 9 and c['out_dir'] == 'from_file'
    apply_overrides(c, ['--max_iters=1', path])  # and the other way round: the file wins
    assert c['max_iters'] == 7


def test_none_default_stays_open_within_one_call(tmp_path):
    # a file may set a None-default key and a later --key may set it back to None
    c = make_config()
    apply_overrides(c, [write(tmp_path, 'seed = 5\n'), '--seed=None'])
    assert c['seed'] is None


# ----------------------------------------------------------------------------- errors, one line each

def test_unknown_key_with_suggestion():
    cfg = dict(make_config(), learning_rate=0.1)
    assert error(['--lerning_rate=0.1'], cfg) == "unknown config key 'lerning_rate' (did you mean 'learning_rate'?)"


def test_unknown_key_without_suggestion():
    assert error(['--zzzz=1']) == "unknown config key 'zzzz'"


@pytest.mark.parametrize('key', ['math', 'helper', '_private', '__name__', 'TABLE'])
def test_non_config_globals_are_not_settable(key):
    assert error([f'--{key}=1']).startswith(f"unknown config key '{key}'")


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = write(tmp_path, 'max_iter = 5\n')
    assert error([path]) == f"unknown config key 'max_iter' in {path} (did you mean 'max_iters'?)"


def test_ignore_unknown_file_keys_skips_only_config_file_keys(tmp_path):
    """model.py reads a training config for its model keys only: the file's other keys are skipped, but an
    unknown --key on the command line is still a (one-line) error."""
    path = write(tmp_path, 'max_iters = 7\nbatch_size = 32\n')
    c = make_config()
    assert apply_overrides(c, [path], ignore_unknown_file_keys=True) == {'max_iters': 7}
    assert 'batch_size' not in c
    with pytest.raises(ConfigError) as e:
        apply_overrides(make_config(), [path, '--batch_size=8'], ignore_unknown_file_keys=True)
    assert str(e.value) == "unknown config key 'batch_size'"
    with pytest.raises(ConfigError, match="unknown config key 'max_iter'"):    # a typo, too
        apply_overrides(make_config(), ['--max_iter=8'], ignore_unknown_file_keys=True)


def test_wrong_type():
    assert error(['--max_iters=abc']) == "config key 'max_iters' expects int, got str ('abc')"


@pytest.mark.parametrize('arg', ['--compile=2', '--compile=1.0', '--max_iters=True', '--max_iters=1.5',
                                 '--learning_rate=True', '--betas=0.9'])
def test_more_type_errors(arg):
    assert 'expects' in error([arg])


def test_wrong_type_in_file_uses_same_validation(tmp_path):
    path = write(tmp_path, 'compile = 1\n')  # ints are not bools, in files as on the command line
    assert error([path]) == f"config key 'compile' in {path} expects bool, got int (1)"


def test_missing_config_file(tmp_path):
    path = str(tmp_path / 'nope.py')
    assert error([path]) == f'config file not found: {path}'


def test_binary_file_as_config_is_one_line(tmp_path):
    path = tmp_path / 'ckpt_0000001.pt'         # e.g. `python sample.py out/ckpt_0000001.pt`
    path.write_bytes(bytes(range(256)) * 4)
    msg = error([str(path)])
    assert str(path) in msg and 'not a Python config file' in msg and '--key=value' in msg


def test_not_key_value():
    assert 'expected --key=value' in error(['--learning_rate', '0.1'])
    assert 'expected --key=value' in error(['-max_iters=3'])
    assert 'did you mean --max_iters=3?' in error(['max_iters=3'])


def test_runtime_error_in_file(tmp_path):
    path = write(tmp_path, 'max_iters = 1\n\nmax_iters = x\n')
    assert error([path]) == f"error in {path} line 3: NameError: name 'x' is not defined"


def test_syntax_error_in_file(tmp_path):
    path = write(tmp_path, 'max_iters = 1\nmax_iters = = 2\n')
    assert error([path]).startswith(f'error in {path} line 2: SyntaxError: ')


def test_multiline_exception_message_is_flattened(tmp_path):
    path = write(tmp_path, 'raise ValueError("two\\nlines")\n')
    assert error([path]) == f'error in {path} line 1: ValueError: two lines'


# ----------------------------------------------------------------------------- configure()

def test_configure_prints_overrides(tmp_path, capsys):
    path = write(tmp_path, 'max_iters = 7\n')
    c = make_config()
    assert configure(c, [path, '--out_dir=x']) == {'max_iters': 7, 'out_dir': 'x'}
    assert capsys.readouterr().out.splitlines() == [f'config: loaded {path}', 'config: max_iters = 7',
                                                    "config: out_dir = 'x'"]


def test_configure_exits_2_with_one_error_line(capsys):
    with pytest.raises(SystemExit) as e:
        configure(make_config(), ['--max_iters=abc'])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: config key 'max_iters' expects int, got str ('abc')\n"


def test_capitalised_names_in_a_config_file_are_unknown_keys(tmp_path):
    """A capitalised assignment in a config file is most likely a mistyped key: an error naming it and
    the key meant, not silently dropped. Helpers in a config file take a leading underscore."""
    path = write(tmp_path, 'MAX_ITERS = 64\n')
    assert error([path]) == f"unknown config key 'MAX_ITERS' in {path} (did you mean 'max_iters'?)"
    assert error(['--TABLE={}']).startswith("unknown config key 'TABLE'")
    path = write(tmp_path, '_WIDTH = 64\nmax_iters = _WIDTH * 2\n', 'helper.py')
    assert apply_overrides(make_config(), [path]) == {'max_iters': 128}


def test_help_lists_every_key_with_its_default_and_exits_0(capsys):
    for flag in ('--help', '-h'):
        with pytest.raises(SystemExit) as e:
            configure(make_config(), ['--max_iters=5', flag])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert 'usage: python' in out and 'config:' not in out    # nothing applied
        keys = [ln.split('=')[0].strip() for ln in out.splitlines() if ln.startswith('  --')]
        assert keys == ['--' + k for k in config_keys(make_config())]
        assert "  --out_dir='out'" in out and '  --max_iters=100' in out and 'TABLE' not in out


SCRIPT = f"""
import sys
sys.path.insert(0, {REPO!r})
from configurator import configure
max_iters = 10
configure(globals())
print('max_iters is', max_iters)
"""


@pytest.mark.parametrize('file_text, arg, expected_err', [
    (None, '--max_iters=abc', "error: config key 'max_iters' expects int, got str ('abc')\n"),
    ('max_iters = 1 / 0\n', None, 'error in {cfg} line 1: ZeroDivisionError: division by zero'),
])
def test_script_subprocess_has_no_traceback(tmp_path, file_text, arg, expected_err):
    script = write(tmp_path, SCRIPT, 'script.py')
    cfg = write(tmp_path, file_text or '', 'cfg.py')
    argv = [arg] if arg else [cfg]
    p = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert 'Traceback' not in p.stderr and p.stderr.count('\n') == 1
    assert expected_err.format(cfg=cfg) in p.stderr
    ok = subprocess.run([sys.executable, script, '--max_iters=20'], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout == 'config: max_iters = 20\nmax_iters is 20\n'
    h = subprocess.run([sys.executable, script, '--help'], capture_output=True, text=True, timeout=60)
    assert h.returncode == 0 and h.stdout.endswith('usage: python script.py [config.py ...] [--key=value ...]   '
                                                   '(keys, with their defaults:)\n  --max_iters=10\n')


# ----------------------------------------------------------------------------- --help: what each key does

DOCUMENTED = """\
# settings
out_dir = 'out'          # where checkpoints go
max_iters = 100          # optimizer steps
                         # (a second line of the same comment)
# a section heading, not part of max_iters' comment
learning_rate = 6e-4
init_from = 'a # b'      # 'scratch' or 'resume'
                            # another column: not a continuation
betas = (0.9,
         0.95)           # Adam betas
seed: int = None  # an annotated one
compile = True
compile = False          # a later assignment: the first comment is the one shown
def helper():
    max_iters = 5        # inside a function: not a config default
"""


def help_lines(config):
    return [ln for ln in usage(config).splitlines() if ln.startswith('  --')]


def test_help_shows_the_comment_beside_each_default(tmp_path):
    """Each key's line is its default and the comment after it in the script's source; a comment
    continued on the lines below in the same column is joined; keys without one show only the default."""
    c = dict(make_config(), __file__=write(tmp_path, DOCUMENTED, 'script.py'))
    assert help_lines(c) == [
        "  --learning_rate=0.0006",
        "  --max_iters=100  optimizer steps (a second line of the same comment)",
        "  --compile=True  a later assignment: the first comment is the one shown",
        "  --out_dir='out'  where checkpoints go",
        "  --init_from='scratch'  'scratch' or 'resume'",
        "  --seed=None  an annotated one",
        "  --betas=(0.9, 0.95)  Adam betas",
    ]


@pytest.mark.parametrize('source', [None, 'max_iters = = 1  # broken\n', b'\xff\xfe\x00binary'])
def test_help_without_a_readable_source_shows_the_defaults(tmp_path, source):
    """A script whose source is missing, does not parse or is not text: --help still lists every key."""
    path = tmp_path / 'script.py'
    if isinstance(source, bytes):
        path.write_bytes(source)
    elif source is not None:
        path.write_text(source)
    c = dict(make_config(), __file__=str(path))
    assert help_lines(c) == [f"  --{k}={c[k]!r}" for k in config_keys(c)]


@pytest.mark.parametrize('script, line', [
    ('sample.py', "  --temperature=0.8  0 = greedy"),                  # passes a copy of its keys: sys.argv[0]
    ('bench.py', "  --what='cvmm'  which section to run"),              # passes globals()
    ('train.py', "  --batch_size=16  the largest micro-batch per process (GPU memory); accumulation makes up the rest"),
])
def test_scripts_help_documents_their_keys(script, line):
    p = subprocess.run([sys.executable, os.path.join(REPO, script), '--help'], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert line in p.stdout.splitlines()
