"""captune.internvl.tokenizer against the original InternLM2Tokenizer (fixtures) and SentencePiece itself."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import pytest
import sentencepiece

from captune.errors import CaptuneError
from captune.inputs.processor import Processor, decode_ids
from captune.inputs.templates import chat_template, get_template
from captune.internvl.tokenizer import image_token_ids, load_tokenizer


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def ref(fixtures):
    return json.loads((fixtures / "tokenization_reference.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def config(tok_dir):
    return json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def sp(tok_dir):
    return sentencepiece.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))


def _expanded_query(ref):
    query = ref["chat_queries"]["internlm2-chat"]
    n = ref["num_image_token"] * ref["n_patches"]
    return query["prompt_with_image_placeholder"].replace("<image>", "<img>" + "<IMG_CONTEXT>" * n + "</img>")


def test_is_fast_and_matches_chat_query_ids(tok, ref):
    assert tok.is_fast
    assert tok(_expanded_query(ref)).input_ids == ref["chat_queries"]["internlm2-chat"]["input_ids"]


def test_training_strings_match_original_ids(tok, ref):
    # the original tokenizes the whole conversation string at once; rebuild it from the fixture's own pieces
    for sample in ref["train"]:
        text = tok.decode(sample["input_ids"][1:])  # bos dropped, as the tokenizer adds it back
        assert tok(text).input_ids == sample["input_ids"]


@pytest.mark.parametrize("case", range(2))
def test_decode_skip_special_matches_original(tok, ref, case):
    entry = ref["decode"][case]
    assert tok.decode(entry["ids"], skip_special_tokens=True) == entry["decoded_skip_special"]


def test_decode_keeps_trailing_and_leading_spaces(tok):
    assert tok.decode([290, 5718, 281, 262, 92542], skip_special_tokens=True) == "A dog. "
    assert tok.decode([262, 290], skip_special_tokens=True) == " A"


def test_added_tokens_keep_their_release_ids(tok, config):
    assert len(config["added_tokens_decoder"]) == 18
    vocab = tok.get_vocab()
    for token_id, entry in config["added_tokens_decoder"].items():
        content = entry["content"]
        assert vocab[content] == int(token_id)
        assert tok.convert_ids_to_tokens(int(token_id)) == content
        assert tok.decode([int(token_id)]) == content
        assert tok.decode([int(token_id)], skip_special_tokens=True) == ""
        assert tok(content, add_special_tokens=False).input_ids == [int(token_id)]
    assert "[UNUSED_TOKEN_145]" not in vocab
    assert len(tok) == 92553


def test_special_tokens_and_settings(tok, config):
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "</s>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    assert tok.model_max_length == config["model_max_length"]
    ids = tok("hello").input_ids
    assert ids[0] == 1 and ids[-1] != 2  # bos prepended, no eos


def test_image_token_ids(tok, config):
    by_content = {e["content"]: int(i) for i, e in config["added_tokens_decoder"].items()}
    assert image_token_ids(tok) == {t: by_content[t] for t in ("<img>", "</img>", "<IMG_CONTEXT>")}


def _random_texts(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    pools = [
        [chr(c) for c in range(32, 127)],
        [" ", "  ", "   ", "\n", "\n\n", "\t", "\t\t", "\r\n", " \n ", "    \n"],
        list("0123456789") + ["2024", "3.14159", "1,000,000"],
        [chr(c) for c in range(0x4E00, 0x9FFF)] + list("，。！？、；：“”‘’（）《》——……·"),
        ["😀", "👍🏽", "🇫🇷", "👨‍👩‍👧", "🤖", "❤️", "🍕", "𝔘𝔫𝔦"],
        list("éèêëàâäôöûüçñÅØßÉœæ") + ["e\u0301", "a\u0308", "ﬁ"],
        [chr(c) for c in list(range(1, 32)) + [127] + list(range(0x80, 0xA0))],  # \x00: see test below
        [chr(c) for c in range(0xE000, 0xE100)] + [chr(0xF0000), chr(0x10FFFD)],
        list("ＡＢＥＦｚａ０") + ["——", "………", "[UNUSED_TOKEN_3]", "[UNUSED_TOKEN_1"],
        [" the", "ing", " of", " and", "http://www.", "\\n", " A man riding a horse."],
    ]
    texts = []
    for _ in range(n):
        parts = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 40))]
        texts.append("".join(parts))
    return texts


@pytest.fixture(scope="module")
def random_texts(tok):
    specials = [str(t) for t in tok.all_special_tokens]
    return [t for t in _random_texts(400) if not any(s in t for s in specials)]


def test_fuzz_ids_and_decode_match_sentencepiece(tok, sp, random_texts):
    assert len(random_texts) > 350
    for text in random_texts:
        ids = tok(text, add_special_tokens=False).input_ids
        assert ids == sp.encode(text), repr(text)
        assert tok.decode(ids) == sp.decode(ids) == text, repr(text)


def test_fuzz_decode_of_arbitrary_ids_matches_sentencepiece(tok, sp):
    rng = random.Random(7)
    for _ in range(300):  # includes lone byte-fallback pieces, i.e. invalid UTF-8
        ids = [rng.randrange(3, 92538) for _ in range(rng.randint(1, 12))]
        assert tok.decode(ids) == sp.decode(ids), ids


def test_null_character_keeps_its_piece(tok):
    # tokenizer.model has "\x00" as a normal piece (354). SentencePiece <= 0.2.1, which the original ran on, encodes
    # it so; 0.2.2 refuses the model and 0.2.3 byte-falls-back to <0x00> (3). captune keeps the original's ids.
    assert tok("a\x00b", add_special_tokens=False).input_ids == [264, 354, 260]
    assert tok.decode([264, 354, 260]) == "a\x00b"


# ------------------------------------------------------------------ byte-fallback pieces, decoded as SentencePiece does
#
# SentencePiece decodes a run of consecutive byte pieces (<0x00>..<0xFF>) as UTF-8 character by character: a
# well-formed character where one starts, else U+FFFD for that one byte, going on at the next byte. tokenizers'
# ByteFallback decoder turns the whole run into U+FFFD as soon as one byte is wrong: `<0x0B><0xD6>` gave
# "\ufffd\ufffd" where the original gives "\x0b\ufffd".

SPECIAL_IDS = (0, 1, 2, *range(92538, 92553))


def _byte_ids(data: bytes) -> list[int]:
    return [3 + b for b in data]  # <0x00> is id 3 (checked below)


def _original_clean_up(text: str) -> str:
    """transformers 4.37.2's `clean_up_tokenization`, which InternLM2Tokenizer.convert_tokens_to_string applies to
    whatever SentencePiece decoded."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _sp_reference(sp, tok, ids, skip_special_tokens=True, clean_up=True) -> str:
    """What the original decodes: SentencePiece on the pieces, special tokens dropped (or kept as their text),
    tokenization spaces cleaned up (`clean_up`)."""
    out, run = [], []
    for i in ids:
        if i in SPECIAL_IDS:
            if not skip_special_tokens:
                out += [sp.decode(run), tok.convert_ids_to_tokens(i)]
                run = []
        else:
            run.append(i)
    text = "".join(out) + sp.decode(run)
    return _original_clean_up(text) if clean_up else text


def test_spaces_cleaned_up_as_the_original(tok, sp, tmp_path):
    """InternLM2Tokenizer cleans up tokenization spaces whatever its config says (" 's" -> "'s", " ." -> ".", ...);
    transformers 5 would not for a BPE tokenizer. The flag is saved with the tokenizer (converted folders)."""
    ids = tok.encode("A man 's hat , isn 't it ? Yes .", add_special_tokens=False)
    assert sp.decode(ids) == "A man 's hat , isn 't it ? Yes ."
    expected = "A man's hat, isn 't it? Yes."  # " n't" only when "n't" is one piece: the original's rules, as they are
    assert decode_ids(tok, ids) == expected
    assert Processor(tok, get_template("internlm2-chat")).decode(ids + [92542]) == expected
    tok.save_pretrained(tmp_path)
    assert decode_ids(load_tokenizer(tmp_path), ids) == expected


def test_byte_piece_ids(sp):
    assert [sp.id_to_piece(3 + b) for b in (0, 0x0B, 0xD6, 0xFF)] == ["<0x00>", "<0x0B>", "<0xD6>", "<0xFF>"]


def test_valid_byte_beside_invalid_one_decodes_as_the_original(tok, sp):
    ids = tok.convert_tokens_to_ids(["▁a", "▁dog", "_id", "<0x0B>", "<0xD6>", "▁it", "<|im_end|>"])
    expected = " a dog_id\x0b\ufffd it"
    assert _sp_reference(sp, tok, ids) == expected
    assert decode_ids(tok, ids) == expected
    assert tok.decode(ids, skip_special_tokens=True) == expected  # the tokenizer's own pipeline too
    assert Processor(tok, get_template("internlm2-chat")).decode(ids) == expected.strip()


BYTE_CASES = {
    "e acute": "é".encode(),
    "han": "中".encode(),
    "emoji": "😀".encode(),
    "flag": "🇫🇷".encode(),
    "three characters": "é中😀".encode(),
    "truncated at the end": "中".encode()[:2],
    "truncated emoji at the end": "😀".encode()[:3],
    "truncated in the middle": "中".encode()[:2] + "é".encode(),
    "character then truncated": "é".encode() + "中".encode()[:2],
    "emoji then truncated emoji": "😀".encode() + "😀".encode()[:2],
    "control bytes": b"\x00\x01\x0b\x1f\x7f\t\n",
    "control then invalid": b"\x0b\xd6",
    "invalid then control": b"\xd6\x0b",
    "lone continuation": b"\x80",
    "continuations": b"\x80\xbf\x80",
    "character then continuation": "é".encode() + b"\x80",
    "continuation then character": b"\xa9" + "中".encode(),
    "overlong": b"\xc0\x80\xe0\x80\x80\xf0\x80\x80\x80",
    "surrogate": b"\xed\xa0\x80",
    "past U+10FFFF": b"\xf4\x90\x80\x80\xf5\x80",
    "ff and fe": b"\xff\xfe",
    "max code point": "\U0010ffff".encode(),
    "ascii between halves": b"\xe4A\xb8\xad",
    "space symbol as bytes": "▁".encode(),
}


@pytest.mark.parametrize("name", BYTE_CASES)
def test_byte_runs_decode_as_sentencepiece(tok, sp, name):
    data = BYTE_CASES[name]
    for ids in (_byte_ids(data),
                tok.convert_tokens_to_ids(["▁a", "▁dog"]) + _byte_ids(data) + tok.convert_tokens_to_ids(["▁it"]),
                [1, *_byte_ids(data), 92542, *_byte_ids(data[:1]), 92544, 290],
                [*_byte_ids(data[:2]), 2, *_byte_ids(data[2:])]):  # a run split by a dropped special token
        for skip in (True, False):
            assert decode_ids(tok, ids, skip_special_tokens=skip) == _sp_reference(sp, tok, ids, skip), (ids, skip)


def _random_byte_heavy_ids(rng: random.Random) -> list[int]:
    chars = ["é", "ß", "中", "語", "😀", "🇫🇷", "\u0800", "\uffff", "\U00010000", "\U0010ffff", "\x0b", "A", "\x7f"]
    ids: list[int] = []
    for _ in range(rng.randint(1, 14)):
        kind = rng.random()
        if kind < 0.3:
            ids += _byte_ids(rng.choice(chars).encode())
        elif kind < 0.45:
            whole = rng.choice(chars).encode()
            ids += _byte_ids(whole[: rng.randint(1, max(1, len(whole) - 1))])  # truncated
        elif kind < 0.65:
            ids += _byte_ids(bytes(rng.choice([rng.randrange(256), rng.randrange(0x80, 0xC0), rng.randrange(0xC0, 0x100)])
                                   for _ in range(rng.randint(1, 3))))
        elif kind < 0.9:
            ids.append(rng.randrange(259, 92538))  # normal and user-defined pieces
        else:
            ids.append(rng.choice(SPECIAL_IDS))
    return ids


def test_fuzz_byte_heavy_ids_decode_as_sentencepiece(tok, sp):
    rng = random.Random(20240611)
    processor = Processor(tok, get_template("internlm2-chat"))
    differed = 0
    for _ in range(3000):
        ids = _random_byte_heavy_ids(rng)
        for skip in (True, False):
            expected = _sp_reference(sp, tok, ids, skip)
            assert decode_ids(tok, ids, skip_special_tokens=skip) == expected, (ids, skip)
            differed += tok.decode(ids, skip_special_tokens=skip) != expected
        stop = ids.index(92542) if 92542 in ids else len(ids)
        assert processor.decode(ids) == _sp_reference(sp, tok, ids[:stop]).split("<|im_end|>")[0].strip(), ids
    assert differed > 50  # the fuzz reaches the runs that the pipeline alone cannot decode (see below)


def _mixes_valid_and_invalid(ids: list[int]) -> bool:
    """Whether a run of non-ASCII byte pieces (C0, C1, F5-FF excepted) holds both a complete character and a byte
    that is not part of one: the only runs that tokenizers' decoder pipeline cannot decode as SentencePiece."""
    runs, run = [], []
    for i in ids:
        b = i - 3 if 3 <= i < 259 else None
        if b is not None and 0x80 <= b and b not in (0xC0, 0xC1) and b < 0xF5:
            run.append(b)
        else:
            runs.append(run)
            run = []
    runs.append(run)
    for run in runs:
        data, k, valid, invalid = bytes(run), 0, False, False
        while k < len(data):
            n = next((n for n in (2, 3, 4) if _is_char(data[k : k + n])), 0)
            valid, invalid, k = valid or n > 0, invalid or n == 0, k + max(n, 1)
        if valid and invalid:
            return True
    return False


def _is_char(data: bytes) -> bool:
    try:
        return len(data.decode("utf-8")) == 1
    except UnicodeDecodeError:
        return False


def test_fuzz_the_tokenizers_own_decode_matches_sentencepiece_but_for_mixed_runs(tok, sp):
    # What a tokenizer saved by captune gives without captune (AutoTokenizer): ASCII and never-valid bytes
    # (C0, C1, F5-FF) split a run as in SentencePiece, so only runs mixing whole multi-byte characters with invalid
    # bytes differ (each of their bytes becomes U+FFFD); captune decodes those with `decode_ids`. transformers 5
    # does not clean up spaces for a BPE tokenizer, whatever the flag: that too is `decode_ids`'s.
    rng = random.Random(99)
    checked = 0
    for _ in range(3000):
        ids = _random_byte_heavy_ids(rng)
        for skip in (True, False):
            if _mixes_valid_and_invalid([i for i in ids if not (skip and i in SPECIAL_IDS)]):
                continue  # a dropped special token does not end a run
            checked += 1
            assert tok.decode(ids, skip_special_tokens=skip) == _sp_reference(sp, tok, ids, skip, clean_up=False), \
                (ids, skip)
    assert checked > 2500  # of 6000
    mixed = _byte_ids("é".encode() + b"\x80")
    assert tok.decode(mixed) == "\ufffd" * 3 and decode_ids(tok, mixed) == sp.decode(mixed) == "é\ufffd"


def test_two_byte_runs_decode_as_sentencepiece(tok, sp):
    for first in (0x00, 0x0B, 0x41, 0x7F, 0x80, 0xA9, 0xBF, 0xC0, 0xC1, 0xC2, 0xC3, 0xDF, 0xE0, 0xE4, 0xED, 0xEF,
                  0xF0, 0xF4, 0xF5, 0xF8, 0xFF):
        ids = [_byte_ids(bytes([first, second])) for second in range(256)]
        assert [decode_ids(tok, i) for i in ids] == [sp.decode(i) for i in ids], first


def test_three_and_four_byte_runs_decode_as_sentencepiece(tok, sp):
    rng = random.Random(5)
    leads = [0xE0, 0xE1, 0xEC, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xC2, 0xDF]
    edges = [0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0]
    for _ in range(4000):
        data = bytes([rng.choice(leads)] + [rng.choice(edges + [rng.randrange(256)]) for _ in range(rng.randint(2, 4))])
        ids = _byte_ids(data)
        assert decode_ids(tok, ids) == sp.decode(ids), data


def test_decode_ids_of_other_tokenizers_is_their_decode(tmp_path):
    class Plain:  # no backend (a slow tokenizer): its own decode
        def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
            return "\ufffd".join(map(str, ids))

    assert decode_ids(Plain(), [1, 2]) == "1\ufffd2"


FRESH_LOAD = textwrap.dedent("""
    import json, sys
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
    assert "captune" not in sys.modules
    job = json.load(open(sys.argv[2], encoding="utf-8"))
    print(json.dumps({
        "ids": [tok(t).input_ids for t in job["texts"]],
        "decoded": [tok.decode(ids, skip_special_tokens=True) for ids in job["decode"]],
        "im_end": tok.decode([92542]),
        "special": [tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token],
        "model_max_length": tok.model_max_length,
        "chat": tok.apply_chat_template(job["messages"], add_generation_prompt=True, tokenize=False),
    }))
""")


@pytest.mark.slow
def test_save_pretrained_reloads_in_fresh_process_without_captune(tok, sp, ref, random_texts, tmp_path):
    out = tmp_path / "exported"
    tok.chat_template = chat_template("internlm2-chat")
    try:
        tok.save_pretrained(out)
    finally:
        tok.chat_template = None
    saved = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "InternLM2" not in json.dumps(saved) and "auto_map" not in saved
    assert saved["model_max_length"] == 8192
    assert (saved["bos_token"], saved["eos_token"], saved["pad_token"], saved["unk_token"]) == (
        "<s>", "</s>", "</s>", "<unk>")

    texts = [_expanded_query(ref)] + random_texts[:100]
    byte_runs = [_byte_ids(data) for name, data in BYTE_CASES.items() if not _mixes_valid_and_invalid(_byte_ids(data))]
    byte_runs.append(tok.convert_tokens_to_ids(["_id", "<0x0B>", "<0xD6>", "▁it"]))
    decode = [entry["ids"] for entry in ref["decode"]] + [tok(t).input_ids for t in random_texts[:100]] + byte_runs
    messages = [{"role": "user", "content": "<image>\n" + ref["question"]}]
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"texts": texts, "decode": decode, "messages": messages}), encoding="utf-8")
    script = tmp_path / "fresh_load.py"
    script.write_text(FRESH_LOAD, encoding="utf-8")
    run = subprocess.run([sys.executable, str(script), str(out), str(job)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])

    assert got["ids"][0] == ref["chat_queries"]["internlm2-chat"]["input_ids"]
    assert got["ids"][1:] == [tok(t).input_ids for t in random_texts[:100]]
    assert got["decoded"][:2] == [entry["decoded_skip_special"] for entry in ref["decode"]]
    assert got["decoded"][2:102] == random_texts[:100]
    assert got["decoded"][102:] == [sp.decode(ids) for ids in byte_runs]  # bytes as the original decodes them
    assert got["decoded"][-1] == "_id\x0b\ufffd it"
    assert got["im_end"] == "<|im_end|>"
    assert got["special"] == ["<s>", "</s>", "</s>", "<unk>"]
    assert got["model_max_length"] == 8192
    assert got["chat"] == ref["chat_queries"]["internlm2-chat"]["prompt_with_image_placeholder"]


def test_missing_protobuf_says_what_to_install(tok_dir, monkeypatch):
    monkeypatch.delitem(sys.modules, "sentencepiece.sentencepiece_model_pb2", raising=False)
    monkeypatch.setitem(sys.modules, "google.protobuf", None)
    with pytest.raises(CaptuneError, match="pip install sentencepiece protobuf"):
        load_tokenizer(tok_dir)


def test_missing_sentencepiece_says_what_to_install(tok_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(CaptuneError, match="pip install sentencepiece protobuf"):
        load_tokenizer(tok_dir)


def test_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CaptuneError, match="no tokenizer files") as err:
        load_tokenizer(tmp_path)
    assert err.value.path == tmp_path


def test_missing_folder(tmp_path):
    with pytest.raises(CaptuneError, match="not found"):
        load_tokenizer(tmp_path / "nope")


def test_malformed_files(tok_dir, tmp_path):
    bad_config = tmp_path / "bad_config"
    bad_config.mkdir()
    (bad_config / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())
    (bad_config / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CaptuneError, match="tokenizer_config.json"):
        load_tokenizer(bad_config)

    bad_model = tmp_path / "bad_model"
    bad_model.mkdir()
    (bad_model / "tokenizer.model").write_bytes(b"\xff\x00 definitely not a protobuf")
    (bad_model / "tokenizer_config.json").write_text((tok_dir / "tokenizer_config.json").read_text())
    with pytest.raises(CaptuneError, match="SentencePiece"):
        load_tokenizer(bad_model)

    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "tokenizer.json").write_text("{}")
    with pytest.raises(CaptuneError, match="cannot load the tokenizer") as err:
        load_tokenizer(bad_json)
    assert err.value.path == bad_json


def test_other_tokenizers_go_through_autotokenizer(tok, tmp_path):
    out = tmp_path / "plain"
    tok.save_pretrained(out)
    again = load_tokenizer(out)
    assert again("A dog.").input_ids == tok("A dog.").input_ids
