"""Image classification: agreement with the original model, and accuracy where labels exist.

Data:

- a folder with one sub-folder per class holding image files (any format Pillow
  reads). A class folder named by an integer is that class index (ImageNet order for
  ImageNet models); otherwise the name must be one of the model's ``config.id2label``
  labels (transformers models). Accuracy is reported for such a folder.
- by default, a fixed built-in set without labels (there is no ImageNet here): the
  natural photographs that ship inside scikit-image (``skimage.data``: astronaut, cat,
  coffee, rocket, motorcycle, camera man, coins, moon, Hubble deep field, retina,
  stained tissue, grass, gravel, brick) and scikit-learn (``load_sample_images``: china,
  flower), 16 images, each in four views: whole image, horizontal flip, top-left and
  bottom-right crops of 75% of each side (64 items). Grayscale images are repeated on
  three channels.

Every image is resized (shorter side to ``resize``), center-cropped to ``size`` and
normalized by :class:`ImagePreprocess` (or the model's own transformers image
processor), then classified one at a time (latency per image).

Metrics against the original model's logits on the same images (the reference, computed
once per ``compare`` run, see :mod:`wclust.tasks.embed`): ``top1_agree`` (percent of
images where the top-1 class is the original's) and ``kl_div`` (mean KL divergence
KL(original || compressed) of the softmax outputs, nats); ``accuracy`` (percent) when
the data has labels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# (name, loader in skimage.data / sklearn.datasets)
_BUILTIN = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle",
    "camera",
    "coins",
    "moon",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "grass",
    "gravel",
    "brick",
    "china",
    "flower",
)
VIEWS = ("full", "flip", "crop_tl", "crop_br")


@dataclass
class ImageItem:
    """One image: ``pixels`` is (H, W, 3) uint8; ``label`` a class folder name or None."""

    name: str
    pixels: np.ndarray
    label: str | None = None


@dataclass
class ImageSet:
    name: str
    items: list[ImageItem] = field(default_factory=list)


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:  # float images in [0, 1]
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def _builtin_image(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def _views(name: str, a: np.ndarray) -> list[ImageItem]:
    h, w = a.shape[:2]
    ch, cw = (3 * h) // 4, (3 * w) // 4
    return [
        ImageItem(f"{name}/full", a),
        ImageItem(f"{name}/flip", np.ascontiguousarray(a[:, ::-1])),
        ImageItem(f"{name}/crop_tl", np.ascontiguousarray(a[:ch, :cw])),
        ImageItem(f"{name}/crop_br", np.ascontiguousarray(a[h - ch :, w - cw :])),
    ]


def builtin_images() -> ImageSet:
    """The built-in unlabelled set (see the module docstring)."""
    try:
        items = [it for n in _BUILTIN for it in _views(n, _rgb(_builtin_image(n)))]
    except ImportError as e:
        raise ImportError(
            "the built-in images need scikit-image and scikit-learn: "
            f"pip install 'wclust[vision]' ({e})"
        ) from None
    return ImageSet("built-in (scikit-image + scikit-learn sample images, 4 views each)", items)


def load_image_folder(path: str | Path) -> ImageSet:
    """Labelled images from ``path/<class>/<image>``, in sorted order."""
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"image folder {root} not found; pass a folder of class sub-folders")
    items = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(f) as im:
                    items.append(ImageItem(f"{d.name}/{f.name}", _rgb(im.convert("RGB")), d.name))
    if not items:
        raise ValueError(
            f"{root} holds no images in class sub-folders (<class>/<image>{IMAGE_SUFFIXES[0]})"
        )
    return ImageSet(str(root), items)


def load_images(path: str | Path | None, limit: int | None = None, every: int = 1) -> ImageSet:
    """The built-in set (``path`` None) or a labelled folder; every n-th, at most ``limit``."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be None or >= 1, got {limit}")
    data = builtin_images() if path is None else load_image_folder(path)
    items = data.items[::every]
    data.items = items[:limit] if limit is not None else items
    return data


def label_index(model, label: str) -> int:
    """Class index of a class-folder name: an integer, or a label in ``config.id2label``."""
    if label.isdigit():
        return int(label)
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    by_name = {str(v).lower(): int(k) for k, v in id2label.items()}
    if label.lower() not in by_name:
        raise ValueError(
            f"class folder {label!r} is neither a class index nor one of the model's labels; "
            "name class folders by index (e.g. 281) or by config.id2label"
        )
    return by_name[label.lower()]


def logits(model, processor, data: ImageSet, *, warmup: bool = True):
    """Logits (n, classes) float32, one image per forward pass, and latencies (s)."""
    import torch

    if processor is None:
        raise ValueError("the vision task needs the model's image processor; none was found")
    model.eval()
    out, latency = [], []
    with torch.inference_mode():
        if warmup:
            x = processor(images=[data.items[0].pixels], return_tensors="pt")["pixel_values"]
            model(x)
        for it in data.items:
            t0 = time.perf_counter()
            x = processor(images=[it.pixels], return_tensors="pt")["pixel_values"]  # (1, 3, H, W)
            y = model(x)
            out.append(getattr(y, "logits", y)[0].float())  # transformers outputs or a tensor
            latency.append(time.perf_counter() - t0)
    return torch.stack(out), latency


def reference(model, processor, data: ImageSet) -> dict:
    """The original model's logits, ``{"logits": (n, classes)}``."""
    lg, _ = logits(model, processor, data, warmup=False)
    return {"logits": lg}


def compare_logits(lg, ref) -> dict:
    """``top1_agree`` (percent) and mean ``kl_div`` = KL(softmax(ref) || softmax(lg))."""
    import torch

    if lg.shape != ref.shape:
        raise ValueError(
            f"logits {tuple(lg.shape)} and reference {tuple(ref.shape)} differ in shape; "
            "was the reference made from other data?"
        )
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(lg, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return {
        "top1_agree": 100.0 * float((lg.argmax(-1) == ref.argmax(-1)).float().mean()),
        "kl_div": float(kl.mean()),
    }


def evaluate(model, processor, data: ImageSet, reference: dict | None = None) -> dict:
    """Classifies ``data``; scores against ``reference`` and the labels when present.

    ``item_errors`` holds the per-image misses behind the first measure (``top1_agree``
    with a reference, else ``accuracy``): ``{"metric", "unit": "images", "edits": 0 or 1
    per image, "words": 1 per image}``, the measure being ``100 - 100 * sum(edits) /
    sum(words)``, so a paired bootstrap over the images (``report.stats``) can say how
    sure a difference between two models on the same images is. None without either.
    """
    lg, latency = logits(model, processor, data)
    quality = compare_logits(lg, reference["logits"]) if reference else {}
    pred = lg.argmax(-1)
    misses = None
    if reference:
        misses = ("top1_agree", (pred != reference["logits"].argmax(-1)).int().tolist())
    labelled = [(i, it.label) for i, it in enumerate(data.items) if it.label is not None]
    if labelled:
        wrong = [int(int(pred[i]) != label_index(model, lab)) for i, lab in labelled]
        quality["accuracy"] = 100.0 * (len(wrong) - sum(wrong)) / len(labelled)
        misses = misses or ("accuracy", wrong)
    items = None
    if misses:
        metric, edits = misses
        items = {"metric": metric, "unit": "images", "edits": edits, "words": [1] * len(edits)}
    return {
        "quality": quality,
        "latency_s": latency,
        "n_images": len(data.items),
        "predictions": [int(i) for i in pred],
        "item_errors": items,
    }
