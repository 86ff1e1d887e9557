"""Tiny tokenizers and models for the lm / embed / vision task tests (no downloads)."""

from __future__ import annotations

import string

import pytest
import torch
from torch import nn

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_char_vocab(path) -> int:
    """A WordPiece vocabulary of single characters: every word splits into letters."""
    chars = list(string.ascii_lowercase + string.digits + ".,;:!?'\"-()")
    vocab = SPECIALS + chars + [f"##{c}" for c in chars]
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return len(vocab)


@pytest.fixture(scope="session")
def char_tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    d = tmp_path_factory.mktemp("tok")
    write_char_vocab(d / "vocab.txt")
    return BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=True)


class TinyClassifier(nn.Module):
    """Conv stem, depthwise conv, pointwise conv, pooled linear head: a MobileNet in small."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, n_classes)

    def forward(self, x):
        h = torch.relu(self.pw(torch.relu(self.dw(torch.relu(self.stem(x))))))
        return self.fc(h.mean((2, 3)))


def tiny_classifier(seed: int = 0) -> TinyClassifier:
    torch.manual_seed(seed)
    return TinyClassifier().eval()
