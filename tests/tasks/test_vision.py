import numpy as np
import pytest
import torch

from tests.tasks.conftest import tiny_classifier
from wclust.models.preprocess import ImagePreprocess
from wclust.tasks import get_task
from wclust.tasks.vision import (
    compare_logits,
    label_index,
    load_images,
)

PRE = ImagePreprocess(size=32, resize=36)


def _folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("3", "7"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            a = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / cls / f"im{i}.png")
    (tmp_path / "3" / "notes.txt").write_text("not an image")
    return tmp_path


def test_preprocess_shape_and_normalization():
    img = np.full((60, 90, 3), 255, dtype=np.uint8)
    x = PRE(images=[img, img[..., 0:1].repeat(3, 2)])["pixel_values"]
    assert x.shape == (2, 3, 32, 32)
    expected = (1 - np.array(PRE.mean)) / np.array(PRE.std)
    assert torch.allclose(x[0, :, 5, 5], torch.tensor(expected, dtype=torch.float32), atol=1e-5)


def test_folder_labels_and_accuracy(tmp_path):
    data = load_images(_folder(tmp_path))
    assert [it.label for it in data.items] == ["3", "3", "7", "7"]
    assert data.items[0].pixels.shape == (40, 50, 3)
    task = get_task("vision")
    model = tiny_classifier()
    ref = task.reference(model, PRE, data)
    r = task.evaluate(model, PRE, data, reference=ref)
    q = r["quality"]
    assert q["top1_agree"] == 100.0 and q["kl_div"] == pytest.approx(0, abs=1e-6)
    preds = ref["logits"].argmax(-1).tolist()
    expected = 100 * sum(p == int(it.label) for p, it in zip(preds, data.items, strict=True)) / 4
    assert q["accuracy"] == expected and len(r["latency_s"]) == 4


def test_metrics_against_another_model(tmp_path):
    data = load_images(_folder(tmp_path), limit=3)
    assert len(data.items) == 3
    ref = get_task("vision").reference(tiny_classifier(0), PRE, data)
    r = get_task("vision").evaluate(tiny_classifier(1), PRE, data, reference=ref)
    assert r["quality"]["kl_div"] > 0


def test_item_errors_are_the_misses_behind_the_first_measure(tmp_path):
    """Per-image misses (for paired intervals): against the reference's top-1 when there
    is one, else against the labels; the measure is 100 minus their rate."""
    data = load_images(_folder(tmp_path))
    task = get_task("vision")
    for seed in range(6):  # some seeds disagree with the reference on some images
        ref = task.reference(tiny_classifier(0), PRE, data)
        r = task.evaluate(tiny_classifier(seed), PRE, data, reference=ref)
        items = r["details"]["item_errors"]
        assert items["metric"] == "top1_agree" and items["unit"] == "images"
        assert items["words"] == [1] * 4 and set(items["edits"]) <= {0, 1}
        assert r["quality"]["top1_agree"] == 100 - 100 * sum(items["edits"]) / 4
        preds = r["details"]["predictions"]
        ref_preds = ref["logits"].argmax(-1).tolist()
        assert items["edits"] == [int(p != q) for p, q in zip(preds, ref_preds, strict=True)]
        alone = task.evaluate(tiny_classifier(seed), PRE, data)["details"]["item_errors"]
        assert alone["metric"] == "accuracy"
        wrong = [int(p != int(it.label)) for p, it in zip(preds, data.items, strict=True)]
        assert alone["edits"] == wrong


def test_compare_logits_known_values():
    ref = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    lg = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    m = compare_logits(lg, ref)
    assert m["top1_agree"] == 50.0
    p = torch.softmax(torch.tensor([0.0, 2.0]), 0)
    kl_row = float((p * (p.log() - p.flip(0).log())).sum())
    assert m["kl_div"] == pytest.approx(kl_row / 2, rel=1e-5)


def test_label_index():
    class Cfg:
        id2label = {0: "cat", 1: "Dog"}

    class M:
        config = Cfg()

    assert label_index(M(), "12") == 12 and label_index(M(), "dog") == 1
    with pytest.raises(ValueError, match="class folder"):
        label_index(M(), "bird")


def test_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_images(tmp_path / "missing")
    with pytest.raises(ValueError, match="no images"):
        load_images(tmp_path)


def test_builtin_images():
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    data = load_images(None)
    assert len(data.items) == 64 and all(it.label is None for it in data.items)
    assert all(it.pixels.ndim == 3 and it.pixels.shape[2] == 3 for it in data.items)
    assert all(it.pixels.dtype == np.uint8 for it in data.items)
    full, flip = data.items[0].pixels, data.items[1].pixels
    assert np.array_equal(full[:, ::-1], flip)
