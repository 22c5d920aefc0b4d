"""Tests for `ckaqad.data` (documents and blocks): loading local text, packing into blocks, the held-out
split, batch order and the built-in corpus. The tiny tokenizer maps every byte to its own id, so expected
token streams are written here as `list(text.encode())` plus EOS."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckaqad.data import documents as data
from ckaqad.data.blocks import (
    DataConfig,
    build_blocks,
    eval_batches,
    load_blocks,
    pack_documents,
    split_documents,
    train_batches,
)
from ckaqad.data.documents import (
    default_corpus,
    load_documents,
    project_prompts,
    render_chat,
    stdlib_documents,
    teacher_answers,
)
from ckaqad.errors import CkaqadError, DataError

PROPS = settings(max_examples=30, deadline=None)
EOS = 257  # the tiny tokenizer's </s>
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CHAT = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]


def byte_stream(docs: list[str]) -> list[int]:
    """The token stream `pack_documents` must produce with the tiny tokenizer: bytes, EOS after each doc."""
    return [t for d in docs for t in [*d.encode(), EOS]]


def write_jsonl(path, records) -> None:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")


def numbered_docs(n: int, length: int = 40) -> list[str]:
    return [f"document {i:03d} " + "abcdefghij"[i % 10] * length for i in range(n)]


# ---------------------------------------------------------------------------------------------------------
# Loading documents


def test_txt_documents_are_blank_line_separated_and_stripped(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("  first doc\nstill first  \n\nsecond doc\n\n\n\n   \n\nthird doc\n")
    assert load_documents(path) == ["first doc\nstill first", "second doc", "third doc"]


def test_md_file_reads_like_txt(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("# title\n\nbody text\n")
    assert load_documents(path) == ["# title", "body text"]


def test_jsonl_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    write_jsonl(path, [{"text": "one", "id": 1}, "", {"text": "two\n\nstill two"}])
    assert load_documents(path) == ["one", "two\n\nstill two"]


def test_jsonl_messages_use_the_chat_template(tmp_path, tiny_tokenizer):
    tiny_tokenizer.chat_template = CHAT_TEMPLATE
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, [{"messages": CHAT}, {"text": "plain"}])
    docs = load_documents(path, tiny_tokenizer)
    assert docs == ["<|user|>What is 2+2?\n<|assistant|>4.\n", "plain"]
    assert docs[0] == tiny_tokenizer.apply_chat_template(CHAT, tokenize=False)


def test_messages_without_a_chat_template_fall_back_to_role_lines(tiny_tokenizer):
    assert tiny_tokenizer.chat_template is None
    assert render_chat(CHAT, tiny_tokenizer) == "user: What is 2+2?\nassistant: 4."
    assert render_chat(CHAT, None) == "user: What is 2+2?\nassistant: 4."


def test_directory_of_files_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("from b/z")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "from a"}) + "\n")
    (tmp_path / "c.txt").write_text("from c\n\nc again")
    (tmp_path / "ignored.csv").write_text("not,read")
    assert load_documents(tmp_path) == ["from a", "from b/z", "from c", "c again"]


def test_datasets_directory_text_column(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["alpha", "", "beta"], "n": [1, 2, 3]}).save_to_disk(tmp_path / "ds")
    assert load_documents(tmp_path / "ds") == ["alpha", "beta"]


def test_datasets_dict_uses_the_train_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["held"]}),
                               "train": datasets.Dataset.from_dict({"text": ["trained on"]})})
    dd.save_to_disk(tmp_path / "dd")
    assert load_documents(tmp_path / "dd") == ["trained on"]


def test_datasets_messages_column_uses_the_chat_template(tmp_path, tiny_tokenizer):
    import datasets

    tiny_tokenizer.chat_template = CHAT_TEMPLATE
    datasets.Dataset.from_dict({"messages": [CHAT]}).save_to_disk(tmp_path / "chat")
    assert load_documents(tmp_path / "chat", tiny_tokenizer) == [
        tiny_tokenizer.apply_chat_template(CHAT, tokenize=False)]


def test_datasets_directory_without_text_or_messages(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"prompt": ["x"]}).save_to_disk(tmp_path / "ds")
    with pytest.raises(DataError, match=r"ds.*no 'text' or 'messages' column.*prompt"):
        load_documents(tmp_path / "ds")


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist.*nowhere.txt"):
        load_documents(tmp_path / "nowhere.txt")


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl"])
@pytest.mark.parametrize("content", ["", "\n\n  \n\t\n"])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=f"no text found in .*{name}"):
        load_documents(path)


def test_empty_directory(tmp_path):
    with pytest.raises(DataError, match="no text found"):
        load_documents(tmp_path)


@pytest.mark.parametrize("record", [{"content": "x"}, {"text": 3}, {"messages": "not a list"}, ["text"], "7"])
def test_jsonl_without_text_or_messages_names_file_and_line(tmp_path, record):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [{"text": "fine"}, record])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a 'text' string or a 'messages' list"):
        load_documents(path)


def test_jsonl_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    write_jsonl(path, [{"text": "fine"}, "", '{"text": "unterminated'])
    with pytest.raises(DataError, match=r"broken\.jsonl:3: not valid JSON"):
        load_documents(path)


def test_unreadable_bytes_name_the_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"cannot read data file .*latin1\.txt"):
        load_documents(path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"unsupported data file .*table\.csv"):
        load_documents(path)


def test_data_error_is_a_ckaqad_error():
    assert issubclass(DataError, CkaqadError)  # so `cli.main` reports it as a usage error (exit 2)


# ---------------------------------------------------------------------------------------------------------
# Packing


def test_pack_documents_golden(tiny_tokenizer):
    blocks = pack_documents(["ab", "cde"], tiny_tokenizer, seq_len=3)
    # stream: a b </s> c d e </s> -> two full blocks, the trailing EOS is dropped (no padding)
    assert blocks.dtype == torch.long
    assert blocks.tolist() == [[97, 98, EOS], [99, 100, 101]]


@PROPS
@given(docs=st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=8), seq_len=st.integers(1, 20))
def test_pack_documents_keeps_the_stream_in_order_without_padding(docs, seq_len):
    from conftest import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    stream = byte_stream(docs)
    blocks = pack_documents(docs, tokenizer, seq_len)
    assert blocks.shape == (len(stream) // seq_len, seq_len)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert len(stream) - blocks.numel() < seq_len  # only a partial last block is dropped
    assert 258 not in blocks.tolist()  # never the pad id


def test_pack_documents_too_short_gives_no_blocks(tiny_tokenizer):
    assert pack_documents(["abc"], tiny_tokenizer, seq_len=8).shape == (0, 8)


# ---------------------------------------------------------------------------------------------------------
# Held-out split and blocks


@PROPS
@given(n=st.integers(2, 60), fraction=st.floats(0.01, 0.99))
def test_split_is_document_level_disjoint_and_deterministic(n, fraction):
    docs = [f"doc{i}" for i in range(n)]
    train, heldout = split_documents(docs, fraction)
    assert train and heldout
    assert sorted(train + heldout) == sorted(docs)  # a partition: disjoint and complete
    assert not set(train) & set(heldout)
    assert train == [d for d in docs if d in train] and heldout == [d for d in docs if d in heldout]  # in order
    assert split_documents(list(docs), fraction) == (train, heldout)


@pytest.mark.parametrize(("n", "fraction", "n_heldout"), [(100, 0.1, 10), (100, 0.25, 25), (10, 0.5, 5),
                                                          (5, 0.1, 1), (2, 0.1, 1), (9, 0.2, 1)])
def test_split_holds_out_about_the_fraction(n, fraction, n_heldout):
    _, heldout = split_documents([f"d{i}" for i in range(n)], fraction)
    assert len(heldout) == n_heldout


def test_split_needs_two_documents():
    with pytest.raises(DataError, match="at least two documents"):
        split_documents(["only"], 0.1)


def test_build_blocks_packs_train_and_heldout_documents_separately(tiny_tokenizer):
    docs = numbered_docs(20)
    blocks = build_blocks(docs, tiny_tokenizer, seq_len=16, heldout_fraction=0.25, source="mine")
    train_docs, heldout_docs = split_documents(docs, 0.25)
    assert torch.equal(blocks.train, pack_documents(train_docs, tiny_tokenizer, 16))
    assert torch.equal(blocks.heldout, pack_documents(heldout_docs, tiny_tokenizer, 16))
    # No held-out document's bytes occur in a training block (each document has a unique number).
    train_text = bytes(b for b in blocks.train.flatten().tolist() if b < 256).decode()
    for doc in heldout_docs:
        assert doc.split()[1] not in train_text
    assert blocks.describe() == (f"mine: {blocks.train.shape[0]} train and {blocks.heldout.shape[0]} held-out "
                                 "blocks of 16 tokens")


def test_build_blocks_too_short_names_seq_len(tiny_tokenizer):
    with pytest.raises(DataError, match=r"too short for blocks of 512 tokens.*--seq-len"):
        build_blocks(numbered_docs(4), tiny_tokenizer, seq_len=512)


def test_build_blocks_rejects_seq_len_over_the_model_maximum(tiny_tokenizer):
    with pytest.raises(DataError, match="--seq-len 64 is longer than the model's maximum 32"):
        build_blocks(numbered_docs(40), tiny_tokenizer, seq_len=64, max_seq_len=32)


@pytest.mark.parametrize(("kwargs", "flag"), [({"seq_len": 7}, "--seq-len"), ({"heldout_fraction": 0.0},
                                              "--heldout-fraction"), ({"heldout_fraction": 1.0}, "--heldout-fraction")])
def test_data_config_checks_name_the_flag(kwargs, flag):
    with pytest.raises(DataError, match=flag):
        DataConfig(**kwargs)


def test_load_blocks_from_a_file(tmp_path, tiny_model, tiny_tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(numbered_docs(30)))
    blocks = load_blocks(DataConfig(data=str(path), seq_len=32, heldout_fraction=0.2), tiny_model, tiny_tokenizer)
    assert blocks.source == str(path)
    assert blocks.train.shape[1] == blocks.heldout.shape[1] == 32
    assert blocks.train.shape[0] > blocks.heldout.shape[0] > 0


def test_load_blocks_rejects_seq_len_over_the_model_maximum(tmp_path, tiny_model, tiny_tokenizer):
    with pytest.raises(DataError, match="--seq-len 1024 is longer than the model's maximum 512"):
        load_blocks(DataConfig(data=str(tmp_path / "unused.txt"), seq_len=1024), tiny_model, tiny_tokenizer)


# ---------------------------------------------------------------------------------------------------------
# Batches


def numbered_blocks(n: int, seq_len: int = 4) -> torch.Tensor:
    """Block i holds the value i everywhere, so a batch's rows name the blocks it drew."""
    return torch.arange(n).repeat_interleave(seq_len).view(n, seq_len)


def drawn(batch: dict[str, torch.Tensor]) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def take(iterator, k: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(iterator, k))


def test_train_batches_shape_and_mask():
    blocks = numbered_blocks(10, seq_len=6)
    for batch in take(train_batches(blocks, batch_size=3, seed=0), 5):
        assert batch["input_ids"].shape == (3, 6) and batch["input_ids"].dtype == torch.long
        assert torch.equal(batch["attention_mask"], torch.ones(3, 6, dtype=torch.long))
        assert all(torch.equal(row, blocks[row[0]]) for row in batch["input_ids"])


@PROPS
@given(n=st.integers(1, 12), batch_size=st.integers(1, 7), seed=st.integers(0, 1000), k=st.integers(0, 12))
def test_train_batches_are_a_pure_function_of_seed_and_step(n, batch_size, seed, k):
    blocks = numbered_blocks(n)
    fresh = [drawn(b) for b in take(train_batches(blocks, batch_size, seed), k + 4)]
    again = [drawn(b) for b in take(train_batches(blocks, batch_size, seed), k + 4)]
    resumed = [drawn(b) for b in take(train_batches(blocks, batch_size, seed, start=k), 4)]
    assert fresh == again
    assert resumed == fresh[k:]


@PROPS
@given(n=st.integers(1, 12), batch_size=st.integers(1, 7), seed=st.integers(0, 1000))
def test_every_epoch_is_one_permutation_of_the_blocks(n, batch_size, seed):
    """Concatenated batches, cut into windows of n, each hold every block exactly once, also when a batch
    straddles two epochs (batch_size does not divide n) or is longer than an epoch."""
    epochs = 3
    steps = -(-epochs * n // batch_size)
    stream = [i for b in take(train_batches(numbered_blocks(n), batch_size, seed), steps) for i in drawn(b)]
    for e in range(epochs):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))


def test_train_batches_shuffle_and_depend_on_the_seed():
    blocks = numbered_blocks(64)
    first = [drawn(b) for b in take(train_batches(blocks, 8, seed=0), 8)]
    other = [drawn(b) for b in take(train_batches(blocks, 8, seed=5), 8)]
    assert sum(first, []) != list(range(64))  # shuffled
    assert first != other


def test_eval_batches_cover_every_heldout_block_once_in_order():
    blocks = numbered_blocks(7, seq_len=3)
    batches = list(eval_batches(blocks, batch_size=3))
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 1]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), blocks)
    assert all(torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"])) for b in batches)


@pytest.mark.parametrize(("limit", "sizes"), [(5, [2, 2, 1]), (4, [2, 2]), (100, [2, 2, 2, 1]), (1, [1])])
def test_eval_batches_limit(limit, sizes):
    blocks = numbered_blocks(7)
    batches = list(eval_batches(blocks, batch_size=2, limit=limit))
    assert [b["input_ids"].shape[0] for b in batches] == sizes
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), blocks[: sum(sizes)])


# ---------------------------------------------------------------------------------------------------------
# Built-in corpus


def test_project_prompts_are_local_and_non_empty():
    prompts = project_prompts()
    assert len(prompts) >= 10
    assert all(p == p.strip() and p for p in prompts)
    assert len(set(prompts)) == len(prompts)


def test_stdlib_documents_are_local_python_source():
    docs = stdlib_documents()
    assert len(docs) >= len(data.STDLIB_MODULES) // 2
    assert all(len(d) > 1000 for d in docs)
    assert any("def dedent(" in d for d in docs)  # textwrap.py


def test_teacher_answers_use_the_generation_prompt_and_restore_padding(tiny_model, tiny_tokenizer):
    tiny_tokenizer.chat_template = CHAT_TEMPLATE
    prompts = ["Hi", "A much longer prompt than the first one"]
    docs = teacher_answers(tiny_model, tiny_tokenizer, prompts, max_new_tokens=4, batch_size=2)
    assert len(docs) == 2
    for prompt, doc in zip(prompts, docs, strict=True):
        assert doc.startswith(f"<|user|>{prompt}\n<|assistant|>")
        assert len(doc) > len(f"<|user|>{prompt}\n<|assistant|>")  # an answer was appended
    assert tiny_tokenizer.padding_side == "right"
    # Greedy: the short prompt's answer does not depend on the left padding of its batch.
    alone = teacher_answers(tiny_model, tiny_tokenizer, prompts[:1], max_new_tokens=4)
    assert alone == docs[:1]


def test_default_corpus_caches_the_teacher_answers(tmp_path, monkeypatch, tiny_model_factory, tiny_tokenizer):
    prompts = ["Say hi.", "Count to three."]
    monkeypatch.setattr(data, "project_prompts", lambda: prompts)
    calls = []
    real = data.teacher_answers

    def generate_once(model, tokenizer, asked, max_new_tokens=data.ANSWER_TOKENS):
        calls.append(asked)
        return real(model, tokenizer, asked, max_new_tokens=8)

    monkeypatch.setattr(data, "teacher_answers", generate_once)
    model = tiny_model_factory(0)
    first = default_corpus(model, tiny_tokenizer, cache_dir=tmp_path)
    assert calls == [prompts]
    cached = list(tmp_path.iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("answers-") and cached[0].suffix == ".json"
    answered = json.loads(cached[0].read_text())
    assert [a.startswith(f"user: {p}") for a, p in zip(answered, prompts, strict=True)] == [True, True]
    assert first == answered + stdlib_documents()

    def no_generation(*args, **kwargs):
        raise AssertionError("the second call must read the cache, not generate")

    monkeypatch.setattr(data, "teacher_answers", no_generation)
    assert default_corpus(tiny_model_factory(0), tiny_tokenizer, cache_dir=tmp_path) == first

    # Another teacher (different config) or other prompts get their own cache entry.
    other = tiny_model_factory(0)
    other.config.rms_norm_eps = 1e-3
    with pytest.raises(AssertionError, match="must read the cache"):
        default_corpus(other, tiny_tokenizer, cache_dir=tmp_path)
    monkeypatch.setattr(data, "project_prompts", lambda: prompts[:1])
    with pytest.raises(AssertionError, match="must read the cache"):
        default_corpus(model, tiny_tokenizer, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == cached  # no temp files left behind


def test_load_blocks_without_data_uses_the_cached_builtin_corpus(tmp_path, monkeypatch, tiny_model, tiny_tokenizer):
    monkeypatch.setenv("CKAQAD_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "project_prompts", lambda: ["p1", "p2"])
    monkeypatch.setattr(data, "teacher_answers", lambda model, tok, prompts: [f"answer to {p}" for p in prompts])
    blocks = load_blocks(DataConfig(data=None, seq_len=64), tiny_model, tiny_tokenizer)
    assert blocks.source == "built-in corpus"
    assert len(list((tmp_path / "corpus").glob("answers-*.json"))) == 1  # under $CKAQAD_CACHE, not ~/.cache
    expected = build_blocks(["answer to p1", "answer to p2", *stdlib_documents()], tiny_tokenizer, 64)
    assert torch.equal(blocks.train, expected.train) and torch.equal(blocks.heldout, expected.heldout)
