"""The compare worker's prepare / reference / measure cells, run in this process on a
tiny BERT (embed task: scored against the original's stored embeddings)."""

import pytest

from wclust.measure import worker


def test_prepare_reference_measure(bert_dir, tmp_path):
    src = str(bert_dir)
    arts = {}
    for method in ("fp32", "kmeans-3b-channel"):
        arts[method] = tmp_path / f"{method}.wclust"
        p = worker.prepare({"model": src, "method": method, "artifact": str(arts[method])})
        assert p["task"] == "embed"
    ref = tmp_path / "ref" / "r.safetensors"
    spec = {"model": src, "task": "embed", "data": None, "limit": 6, "every": 2, "threads": 1}
    worker.reference({**spec, "path": str(ref)})
    assert ref.exists() and not list(ref.parent.glob(".*tmp"))
    rows = {}
    for method, art in arts.items():
        rows[method] = worker.measure(
            {**spec, "artifact": str(art), "source": src, "runtime": None, "reference": str(ref)}
        )
    fp32, attn = rows["fp32"]["quality"], rows["kmeans-3b-channel"]["quality"]
    assert fp32["cos_sim"] == pytest.approx(1.0, abs=1e-6) and fp32["nn_recall"] == 100.0
    assert attn["cos_sim"] < fp32["cos_sim"]
    assert rows["fp32"]["n_items"] == 6


def test_calibrated_method_without_a_loss_fails_clearly(bert_dir, tmp_path):
    with pytest.raises(ValueError, match="no loss"):
        worker.prepare(
            {
                "model": str(bert_dir),
                "method": "kmeans:bits=4+fisher",
                "artifact": str(tmp_path / "x.wclust"),
            }
        )
