"""Tiny models shared by the compare tests (no downloads)."""

import pytest

from tests.conftest import tiny_bert
from tests.tasks.conftest import write_char_vocab


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    """A tiny random-init BERT with a character vocabulary: the embed task, scored
    against the original's stored embeddings (a reference cell)."""
    from transformers import BertTokenizerFast

    d = tmp_path_factory.mktemp("bert")
    tiny_bert().save_pretrained(d)
    write_char_vocab(d / "vocab.txt")
    BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    return d
