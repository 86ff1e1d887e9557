"""The original whisper-base's GPTQ input Hessians on perturbed copies of the built-in
train-clean clips, for ``gptq_file.py --hessians``.

The built-in calibration speech is clean read speech; the test-other clips are not.
Each clip is played 10% slower or faster (alternately; faster where the slower copy
would come near Whisper's 30 s window) with noise added at a random SNR; the labels stay the
original's stored transcripts of the clean clips. ``--mix`` averages the result with
the Hessians of the clean clips (as ``gptq_file.py --hessians`` wrote them), one half
each:

    python benchmarks/gptq_file.py h325.wclust v.wclust --hessians h251.safetensors
    python benchmarks/hessians_augmented.py hmix.safetensors --mix h251.safetensors
    python benchmarks/gptq_file.py h325.wclust aug.wclust --hessians hmix.safetensors \\
      --embed-damp 0.1 --refit 1
"""

from __future__ import annotations

import argparse
import time


def perturbed(items, noise: str, seed: int) -> list:
    """One copy of each clip: speed 0.9/1.1 alternately, then ``noise`` ("white": white
    noise at 10-25 dB SNR; "pink": half the clips low-passed at 3.5-6 kHz, then pink
    noise at 5-20 dB SNR)."""
    from dataclasses import replace

    import numpy as np
    from scipy.signal import butter, sosfilt

    from wclust.tasks.asr import MAX_SECONDS, SAMPLE_RATE, speed_perturb

    rng = np.random.default_rng(seed)
    out = []
    for i, s in enumerate(items):
        slow = i % 2 == seed % 2 and s.seconds < MAX_SECONDS - 4  # 0.9x fits the window
        a = speed_perturb([s], (0.9 if slow else 1.1,))[0].audio.astype(np.float64)
        power = float(np.mean(a**2))
        if noise == "white":
            snr = rng.uniform(10, 25)
            n = rng.standard_normal(len(a)) * np.sqrt(power / 10 ** (snr / 10))
        else:
            if rng.random() < 0.5:
                cut = rng.uniform(3500, 6000)
                a = sosfilt(butter(6, cut, fs=SAMPLE_RATE, output="sos"), a)
                power = float(np.mean(a**2))
            spectrum = np.fft.rfft(rng.standard_normal(len(a)))
            n = np.fft.irfft(spectrum / np.sqrt(np.arange(len(spectrum)) + 1.0), n=len(a))
            snr = rng.uniform(5, 20)
            n *= np.sqrt(power / 10 ** (snr / 10) / np.mean(n**2))
        out.append(replace(s, name=f"{s.name}@{noise}", audio=(a + n).astype(np.float32)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="where the Hessians go (.safetensors)")
    ap.add_argument("--noise", choices=("white", "pink"), default="white")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mix", help="clean clips' Hessians (.safetensors) to average with")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file, save_file

    from wclust.models import load_model
    from wclust.stages.gptq import collect_hessians
    from wclust.tasks import TaskData

    torch.set_num_threads(args.threads)
    t0 = time.time()
    loaded = load_model("whisper-base")
    data = TaskData.load(loaded, None)
    data.items = perturbed(data.items, args.noise, args.seed)
    with torch.no_grad():
        h = collect_hessians(loaded.model, data.batches(loaded.model))
    if args.mix:
        clean = load_file(args.mix)
        if clean.keys() != h.keys():
            raise SystemExit(f"{args.mix} holds other layers than whisper-base's Linear inputs")
        h = {k: (0.5 * (h[k] + clean[k])).contiguous() for k in h}
    save_file(h, args.out)
    print(f"{len(h)} Hessians from {len(data.items)} perturbed clips in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
