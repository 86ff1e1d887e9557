"""Input preprocessing that model sources hand out as a model's processor."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ImagePreprocess"]


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize the shorter side to ``resize``, center-crop ``size`` x ``size``, scale to
    [0, 1], normalize per channel. Called like a transformers image processor."""

    size: int = 224
    resize: int = 256
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __call__(self, images, return_tensors: str = "pt") -> dict:
        import torch
        from PIL import Image

        out = []
        for img in images:
            im = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
            im = im.convert("RGB")
            w, h = im.size
            s = self.resize / min(w, h)
            im = im.resize((max(self.size, round(w * s)), max(self.size, round(h * s))), 2)
            w, h = im.size
            left, top = (w - self.size) // 2, (h - self.size) // 2
            im = im.crop((left, top, left + self.size, top + self.size))
            x = np.asarray(im, dtype=np.float32) / 255.0  # (H, W, 3)
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
            out.append(torch.from_numpy(x.transpose(2, 0, 1).copy()))  # (3, H, W)
        return {"pixel_values": torch.stack(out)}  # (n, 3, size, size)
