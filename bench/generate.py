"""Built-in model speed: malerei against the stock diffusers pipeline on the same weights.

    python bench/generate.py                       # the built-in model, CPU, 64 px, 20 steps, CFG
    OMP_NUM_THREADS=2 python bench/generate.py --repeats 5

Three rows (goals from the built-in model's issue, 2 CPU cores): one image (< 0.5 s), a batch of
16 per image (< 0.15 s), and `malerei generate` from a cold process to the written PNG (< 5 s).
Each row has a baseline measured in the same run: the stock StableDiffusionPipeline with the
same scheduler, steps, CFG and seed (for the cold row: a cold process that loads the stock
pipeline and writes a PNG). Runs alternate after a warm-up; the table shows medians and the
ratio malerei / baseline.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPT = "a large red circle in the center on a blue background"

COLD_BASELINE = """
import sys, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], local_files_only=True)
pipe.set_progress_bar_config(disable=True)
img = pipe(sys.argv[2], num_inference_steps=20, guidance_scale=float(sys.argv[3]),
           generator=torch.Generator("cpu").manual_seed(1)).images[0]
img.save(sys.argv[4])
"""


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "malerei" / "models" / "shapes"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from malerei.engine.loading import load_model
    from malerei.engine.pipeline import GenerationParams, generate

    model = load_model(args.model, device="cpu")
    cfg = float(model.defaults.get("cfg_scale", 5.0))
    rescale = float(model.defaults.get("guidance_rescale", 0.0))
    stock = StableDiffusionPipeline.from_pretrained(args.model, local_files_only=True)
    stock.scheduler = EulerDiscreteScheduler.from_config(stock.scheduler.config)
    stock.set_progress_bar_config(disable=True)

    def ours(batch: int):
        return lambda: generate(model, GenerationParams(prompt=PROMPT, sampler="Euler", steps=args.steps, cfg_scale=cfg,
                                                        seed=1, batch_size=batch), preview_every=0)

    def theirs(batch: int):
        return lambda: stock(PROMPT, num_inference_steps=args.steps, guidance_scale=cfg, guidance_rescale=rescale,
                             num_images_per_prompt=batch, generator=[torch.Generator("cpu").manual_seed(1 + i) for i in range(batch)],
                             output_type="np")

    rows = []
    for label, batch in (("one image", 1), ("batch of 16, per image", 16)):
        ours(batch)(), theirs(batch)()  # warm-up
        a, b = [], []
        for _ in range(args.repeats):
            a += timed(ours(batch), 1)
            b += timed(theirs(batch), 1)
        rows.append((label, statistics.median(a) / batch, statistics.median(b) / batch))

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "malerei", "generate", PROMPT, "--model", args.model, "--sampler", "Euler",
               "--steps", str(args.steps), "--seed", "1", "--out", tmp]
        base = [sys.executable, "-c", COLD_BASELINE, args.model, PROMPT, str(cfg), str(Path(tmp) / "stock.png")]
        a = timed(lambda: subprocess.run(cmd, check=True, capture_output=True), args.repeats)
        b = timed(lambda: subprocess.run(base, check=True, capture_output=True), args.repeats)
        rows.append(("cold process to PNG", statistics.median(a), statistics.median(b)))

    print(f"model {args.model}, {args.steps} steps, CFG {cfg}, torch threads {torch.get_num_threads()}")
    print(f"{'':26s} {'malerei s':>10s} {'diffusers s':>12s} {'ratio':>7s}")
    for label, ours_s, theirs_s in rows:
        print(f"{label:26s} {ours_s:10.3f} {theirs_s:12.3f} {ours_s / theirs_s:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
