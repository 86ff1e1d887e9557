"""The transformers path against the .wclust path, one recipe, the same clips.

    python benchmarks/hf_wer.py [--model whisper-base] [--recipe scaled-4b] [--limit N]

1. The original as an fp32 Hugging Face folder; ``from_pretrained(folder,
   quantization_config=WclustConfig(recipe=R))``; ``save_pretrained``.
2. A fresh process: ``import wclust``, ``from_pretrained(saved folder)``, then the
   ``transformers`` ASR pipeline, greedy (``num_beams=1``), on the evaluation clips.
3. The .wclust path: ``wclust.compress_(model, R)``, ``wclust.save``, ``wclust.load``,
   ``wclust.tasks.asr.evaluate`` on the same clips.

Prints both WER/CER (Whisper's English normalizer, as ``wclust compare``), whether
every clustered tensor is identical, and the clustered tensor bytes of both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FRESH = r"""
import json, sys, time
import wclust, torch, transformers
from wclust.tasks.asr import builtin_eval_dir, load_audio_dir, wer_cer
folder, limit = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(2)
t0 = time.perf_counter()
model = transformers.AutoModelForSpeechSeq2Seq.from_pretrained(folder)
proc = transformers.AutoProcessor.from_pretrained(folder)
load_s = time.perf_counter() - t0
# as loaded (the kernels widen some codes into their layout on first use)
n = sum(p.numel() * p.element_size() for n_, p in model.named_buffers() if ".clustered." in n_)
asr = transformers.pipeline("automatic-speech-recognition", model=model,
    tokenizer=proc.tokenizer, feature_extractor=proc.feature_extractor, device="cpu")
clips = load_audio_dir(builtin_eval_dir())[:limit or None]
gen = {"num_beams": 1, "max_new_tokens": 128, "language": "en", "task": "transcribe"}
if not getattr(model.generation_config, "is_multilingual", True):
    gen = {"num_beams": 1, "max_new_tokens": 128}
hyp = [asr({"raw": c.audio, "sampling_rate": 16000}, generate_kwargs=gen)["text"].strip()
       for c in clips]
print(json.dumps({"scores": wer_cer([c.text for c in clips], hyp), "load_s": load_s,
                  "clustered_bytes": n, "hypotheses": hyp}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="whisper-base")
    p.add_argument("--recipe", default="scaled-4b")
    p.add_argument("--limit", type=int, default=0, help="first N clips (0: all 100)")
    args = p.parse_args()

    import torch
    from safetensors import safe_open

    import wclust
    from wclust.integrations.transformers import WclustConfig
    from wclust.models import architecture_for, load_model
    from wclust.tasks.asr import builtin_eval_dir, evaluate, load_audio_dir

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="hf_wer_"))
    fp32, saved, file = work / "fp32", work / "hf", work / "model.wclust"
    loaded = load_model(args.model)
    loaded.model.save_pretrained(fp32)
    loaded.processor.save_pretrained(fp32)

    from transformers import AutoModelForSpeechSeq2Seq

    t0 = time.perf_counter()
    hf = AutoModelForSpeechSeq2Seq.from_pretrained(
        fp32, quantization_config=WclustConfig(recipe=args.recipe)
    )
    compress_s = time.perf_counter() - t0
    hf.save_pretrained(saved)
    loaded.processor.save_pretrained(saved)
    del hf
    r = subprocess.run(
        [sys.executable, "-c", FRESH, str(saved), str(args.limit)],
        capture_output=True,
        text=True,
        check=True,
    )
    fresh = json.loads(r.stdout.strip().splitlines()[-1])

    model = load_model(args.model).model
    wclust.compress_(model, args.recipe)
    wclust.save(model, file)
    model = wclust.load(file, model_factory=architecture_for(args.model))
    # as loaded, before the kernels switch some codes to their layout
    mine = {n: b.clone() for n, b in model.named_buffers() if ".clustered." in n}
    clips = load_audio_dir(builtin_eval_dir())[: args.limit or None]
    ours = evaluate(model, loaded.processor, clips)

    # identical tensors: every clustered buffer of the HF folder against the file's
    hf_t = {}
    for f in saved.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            hf_t.update({k: h.get_tensor(k) for k in h.keys() if ".clustered." in k})
    same = [torch.equal(hf_t[k], mine[k]) for k in hf_t if k in mine]
    out = {
        "model": args.model,
        "recipe": args.recipe,
        "clips": len(clips),
        "hf_pipeline": fresh["scores"],
        "wclust_file": {"wer": ours["wer"], "cer": ours["cer"]},
        "same_transcripts": sum(
            a == b for a, b in zip(fresh["hypotheses"], ours["hypotheses"], strict=True)
        ),
        "tensors_compared": len(same),
        "tensors_identical": sum(same),
        "hf_clustered_bytes": fresh["clustered_bytes"],
        "file_clustered_bytes": sum(b.numel() * b.element_size() for b in mine.values()),
        "compress_on_load_s": round(compress_s, 1),
        "fresh_load_s": round(fresh["load_s"], 1),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
