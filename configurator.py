"""
Override a script's config from the command line, nanoGPT style:
    $ python train.py config/train_shakespeare_char.py --batch_size=32 --out_dir=out/run1
Positional args are config files (Python assigning some of the script's globals), --key=value args
set single keys; applied left to right, later ones win. Unlike nanoGPT's exec(open(...).read()),
this is an importable module, every override is type-checked against its default, and a mistake
gives one clear line instead of a traceback (or a silently ignored typo).
"""
import ast
import difflib
import io
import os
import sys
import tokenize
import traceback
import types


class ConfigError(ValueError):
    """A bad override. The message is a single line, meant to be shown to the user as-is."""


def fail(msg):
    """One clear line and a non-zero exit; raised on every rank so none hangs waiting for the others."""
    raise SystemExit(f"error: {msg}")


def _is_data(key, value):
    # a script's globals() also holds imports, helper functions/classes and dunders
    return not key.startswith('_') and not isinstance(value, types.ModuleType) and not callable(value)


def _is_config_value(key, value):
    # ... and CONSTANTS (all capitals, e.g. a table the script uses): only plain lower-case data is config
    return _is_data(key, value) and not key.isupper()


def config_keys(config):
    """The plain config keys of `config`, e.g. to save them into a checkpoint."""
    return [k for k, v in config.items() if _is_config_value(k, v)]


def _convert(value, default, raw):
    """`value` as the type of `default` (which is not None), or None when it does not fit.
    `raw` is the command-line text `value` was parsed from (None for config files)."""
    is_int = isinstance(value, int) and not isinstance(value, bool)  # bool is a subclass of int
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = raw if raw is not None else value  # so --compile=1 and --compile=false work too
        bools = {'true': True, '1': True, 'false': False, '0': False}
        return bools.get(text.lower()) if isinstance(text, str) else None
    if isinstance(default, str):  # strings are never type errors: --out_dir=123 means the directory '123'
        return value if isinstance(value, str) else raw
    if isinstance(default, float):  # --lr=1 is a fine way to write 1.0
        return float(value) if is_int or isinstance(value, float) else None
    if isinstance(default, int):
        return value if is_int else None
    if isinstance(default, (tuple, list)):  # e.g. --betas=[0.9,0.95] for a tuple default
        return type(default)(value) if isinstance(value, (tuple, list)) else None
    return value if isinstance(value, type(default)) else None


def _check(key, value, defaults, raw=None, where=''):
    """Return `value` converted to the type of defaults[key], or raise ConfigError.
    This one function validates both config-file assignments and --key=value args."""
    if key not in defaults or not _is_config_value(key, defaults[key]):
        close = difflib.get_close_matches(key.lower(), config_keys(defaults), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ''
        raise ConfigError(f"unknown config key {key!r}{where}{hint}")
    default = defaults[key]
    if default is None:  # nothing to check against: a None default means "unset, anything goes"
        return value
    new = _convert(value, default, raw)
    if new is None:
        got = f"{type(value).__name__} ({value!r})"
        raise ConfigError(f"config key {key!r}{where} expects {type(default).__name__}, got {got}")
    return new


def _describe_error(e, path):
    """One line saying what went wrong where in config file `path`."""
    if isinstance(e, SyntaxError) and e.filename == path:
        line, msg = e.lineno, e.msg  # str(e) would repeat the file and line
    else:  # the innermost frame that belongs to the config file (it may have called into other code)
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == path]
        line, msg = (frames[-1].lineno if frames else '?'), str(e)
    return ' '.join(f"error in {path} line {line}: {type(e).__name__}: {msg}".splitlines())


def _run_config_file(path, config):
    """Execute config file `path` with the current config values visible; return what it assigned."""
    scope = {k: config[k] for k in config_keys(config)}
    before = dict(scope)
    scope['__file__'] = path        # so a config can include a sibling relative to itself
    try:
        with open(path, encoding='utf-8') as f:
            source = f.read()
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a Python config file (positional arguments are config files; "
                          f"options are --key=value)") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        exec(compile(source, path, 'exec'), scope)
    except Exception as e:
        raise ConfigError(_describe_error(e, path)) from None
    # 'is not' finds what the file (re)assigned; imports and helper functions are not config values.
    # A capitalised name is returned too, so that it fails as an unknown key (a typo of a key, most
    # likely) instead of being dropped; helpers in a config file take a leading underscore.
    return {k: v for k, v in scope.items() if _is_data(k, v) and (k not in before or v is not before[k])}


def _read_arg(arg, config):
    """Turn one command-line arg into a list of (key, value, raw), plus where they came from."""
    if arg.startswith('-'):
        key, sep, raw = arg[2:].partition('=')  # partition: only the first '=' splits, so --start=a=b works
        if not arg.startswith('--') or not sep:
            raise ConfigError(f"expected --key=value (no spaces), got {arg!r}")
        try:
            value = ast.literal_eval(raw)
        except Exception:  # not a Python literal (e.g. out/run1 or resume): it is meant as a plain string
            value = raw
        return [(key, value, raw)], ''
    if not os.path.isfile(arg):
        hint = f" (did you mean --{arg}?)" if '=' in arg else ''
        raise ConfigError(f"config file not found: {arg}{hint}")
    return [(k, v, None) for k, v in _run_config_file(arg, config).items()], f" in {arg}"


def apply_overrides(config, argv, verbose=False, ignore_unknown_file_keys=False):
    """Apply config files and --key=value args (in the order given) to `config` (a dict, typically a
    script's globals()). Only keys already present in `config` that are plain config values (not
    starting with '_', not ALL-CAPS constants, not modules/functions/classes) may be set. Returns
    {key: new_value} of every key set; raises ConfigError (args before the bad one stay applied).
    verbose: print each.
    ignore_unknown_file_keys: skip keys a config FILE sets that this script does not have (model.py
    reads a training config only for its model keys); --key=value typos are still errors."""
    defaults = dict(config)  # check types against the values before any override, so None defaults stay open
    changed = {}
    for arg in argv:
        updates, where = _read_arg(arg, config)
        if verbose and where:
            print(f"config: loaded {arg}")
        for key, value, raw in updates:
            if where and ignore_unknown_file_keys and key not in defaults:
                continue
            config[key] = changed[key] = _check(key, value, defaults, raw, where)
            if verbose:
                print(f"config: {key} = {config[key]!r}")
    return changed


def key_comments(path):
    """{key: comment} from the script `path`: the comment after each top-level `key = value` (on the
    statement's last line), joined with the comment-only lines right below it that start in the same
    column. Only for --help: a script that cannot be read or parsed just has no comments."""
    try:
        with tokenize.open(path) as f:          # honours a coding cookie, like Python itself
            source = f.read()
        tree = ast.parse(source)
        comments = {t.start[0]: t for t in tokenize.generate_tokens(io.StringIO(source).readline)
                    if t.type == tokenize.COMMENT}
    except Exception:   # missing (python -c), unreadable, not Python: --help must still print the keys
        return {}
    lines = source.splitlines()
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
        else:
            continue
        row = node.end_lineno
        if row not in comments:
            continue
        col = comments[row].start[1]
        parts = [comments[row].string]
        while row + 1 in comments and comments[row + 1].start[1] == col and not lines[row][:col].strip():
            row += 1
            parts.append(comments[row].string)
        text = ' '.join(p.lstrip('#').strip() for p in parts).strip()
        for name in names:
            if text:
                found.setdefault(name, text)     # a later reassignment does not replace the documented default
    return found


def usage(config):
    """What -h / --help prints: the running script's docstring, then every key with its default and
    what it does (the comment beside the default in the script's source)."""
    doc = (getattr(sys.modules.get('__main__'), '__doc__', None) or '').strip()
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else 'script.py'
    # scripts pass globals() (which has __file__) or a copy of their config keys: then it is sys.argv[0]
    source = config.get('__file__') or (sys.argv[0] if sys.argv else '')
    comments = key_comments(source) if source else {}
    lines = [doc, ''] if doc else []
    lines.append(f"usage: python {script} [config.py ...] [--key=value ...]   (keys, with their defaults:)")
    lines += [f"  --{k}={config[k]!r}" + (f"  {comments[k]}" if k in comments else '') for k in config_keys(config)]
    return '\n'.join(lines)


def configure(config, argv=None, ignore_unknown_file_keys=False):
    """What scripts call: `configure(globals())`. argv defaults to sys.argv[1:]. Prints each override
    so runs are self-documenting; on a ConfigError prints 'error: <message>' and exits with status 2.
    -h / --help prints `usage(config)` and exits with status 0."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ('-h', '--help') for a in argv):
        print(usage(config))
        sys.exit(0)
    try:
        return apply_overrides(config, argv, verbose=True, ignore_unknown_file_keys=ignore_unknown_file_keys)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)  # 2 = command-line usage error, like argparse; no traceback for a user's typo
