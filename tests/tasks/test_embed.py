import pytest
import torch

from tests.conftest import tiny_bert
from wclust.tasks import get_task
from wclust.tasks.embed import (
    compare_embeddings,
    load_sentences,
    nearest_neighbours,
)


def test_builtin_sentences_and_subsets(tmp_path):
    full = load_sentences(None)
    assert len(full.sentences) == 256 and not any(s.startswith("#") for s in full.sentences)
    sub = load_sentences(None, limit=5, every=3)
    assert sub.sentences == full.sentences[::3][:5]
    (tmp_path / "one.txt").write_text("# comment\nonly one\n\n")
    with pytest.raises(ValueError, match="at least 2"):
        load_sentences(tmp_path / "one.txt")
    with pytest.raises(ValueError, match="not found"):
        load_sentences(tmp_path / "missing.txt")


def test_metrics_on_known_vectors():
    ref = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 0.1, 1]])
    ref = torch.nn.functional.normalize(ref, dim=1)
    assert nearest_neighbours(ref).tolist() == [1, 0, 1]
    same = compare_embeddings(ref, ref)
    assert same["cos_sim"] == pytest.approx(1.0) and same["nn_recall"] == 100.0
    flipped = ref.clone()
    flipped[2] = torch.nn.functional.normalize(torch.tensor([1.0, 0, 0.2]), dim=0)
    m = compare_embeddings(flipped, ref)
    assert m["cos_min"] < 0.3 and m["nn_recall"] == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="shape"):
        compare_embeddings(ref[:2], ref)


def test_task_against_reference(char_tokenizer):
    task = get_task("embed")
    assert not task.lower_is_better and task.calibration_batches is None
    model = tiny_bert()
    data = task.load_data(None, 12)
    ref = task.reference(model, char_tokenizer, data)
    assert ref["embeddings"].shape == (12, 64)
    assert torch.allclose(ref["embeddings"].norm(dim=1), torch.ones(12), atol=1e-5)
    r = task.evaluate(model, char_tokenizer, data, reference=ref)
    assert r["quality"]["cos_sim"] == pytest.approx(1.0, abs=1e-5)
    assert r["quality"]["nn_recall"] == 100.0 and len(r["latency_s"]) == 12
    other = tiny_bert(seed=1)
    r2 = task.evaluate(other, char_tokenizer, data, reference=ref)
    assert r2["quality"]["cos_sim"] < 0.999
