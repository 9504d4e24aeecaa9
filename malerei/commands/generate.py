"""``malerei generate``, ``malerei samplers``, ``malerei models``, ``malerei info``.

    malerei generate "a red circle on a blue background" --steps 20 --seed 42
    malerei generate --prompt-file prompts.txt --model my-model --out shots/
    malerei generate --from outputs/00003-42.png          # the same pixels again
    malerei samplers                                      # sampler names and schedule types
    malerei models --models-dir ~/models                  # models with A1111 short hashes
    malerei info outputs/00003-42.png                     # how an image was made

``generate`` prints the path of every image it writes, one per line, in order, and nothing else
on stdout; progress goes to stderr. Every failure a user can cause ends in one ``error: ...``
line and exit status 2 (``malerei.cli`` maps :class:`MalereiError`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from malerei.engine.errors import ImageError, InvalidParameter

DEFAULT_OUT = Path("outputs")
_NUMBERED = re.compile(r"^(\d+)-")


def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make argparse's own errors (bad number, unknown option) one ``error: ...`` line, exit 2."""

    def error(message: str):
        parser.exit(2, f"error: {parser.prog}: {message}\n")

    parser.error = error  # type: ignore[method-assign]
    return parser


def register(sub: argparse._SubParsersAction) -> None:
    p = _one_line_errors(sub.add_parser(
        "generate", help="text to image: write PNGs and print their paths",
        description="Generate images from a prompt (or each line of --prompt-file). Writes "
                    "A1111-style numbered PNGs with their parameters into --out and prints each "
                    "path on its own line. Options left out come from the model's defaults.",
    ))
    p.add_argument("prompt", nargs="?", help="the prompt (A1111 syntax: (word:1.2), [word], BREAK, <lora:name:0.8>)")
    p.add_argument("--negative", metavar="TEXT", default=None, help="negative prompt")
    p.add_argument("--prompt-file", metavar="FILE", type=Path, default=None,
                   help="one prompt per non-empty line; line i gets seed SEED+i (SEED+i*BATCH with --batch)")
    p.add_argument("--from", dest="from_image", metavar="IMAGE", type=Path, default=None,
                   help="make a PNG again from its recipe (malerei) or infotext (A1111); options given "
                        "here override it")
    p.add_argument("--model", metavar="NAME|PATH", default=None,
                   help="model name in --models-dir, or a path (default: the built-in model)")
    p.add_argument("--models-dir", metavar="DIR", type=Path, default=None,
                   help="models folder (default: $MALEREI_MODELS_DIR or the user data dir)")
    p.add_argument("--allow-pickle", action="store_true", default=None,
                   help="allow pickle checkpoints (.ckpt/.pt/.bin): they can run code, use only trusted files")
    p.add_argument("--sampler", metavar="NAME", default=None, help="A1111 sampler name (see `malerei samplers`)")
    p.add_argument("--scheduler", metavar="NAME", default=None,
                   help="A1111 schedule type: Automatic, Karras, Exponential, ... (see `malerei samplers`)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (1..150)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (0..30)")
    p.add_argument("--seed", type=int, default=None, help="seed; negative (default -1): a random seed, recorded")
    p.add_argument("--variation-seed", type=int, default=None, help="A1111 variation seed (-1: random)")
    p.add_argument("--variation-strength", type=float, default=None, help="A1111 variation strength (0..1)")
    p.add_argument("--width", type=int, default=None, help="image width, a multiple of 8")
    p.add_argument("--height", type=int, default=None, help="image height, a multiple of 8")
    p.add_argument("--batch", type=int, default=None, help="images per prompt (1..64), seeds SEED..SEED+N-1")
    p.add_argument("--clip-skip", type=int, default=None, help="A1111 clip skip (1: last layer)")
    p.add_argument("--out", metavar="DIR", type=Path, default=None, help=f"output folder (default: ./{DEFAULT_OUT})")
    p.add_argument("--device", default=None, help="auto, cuda, cuda:N, mps or cpu (default: auto)")
    p.add_argument("--dtype", default=None, help="auto, fp32, fp16 or bf16 (default: fp16 on GPUs, fp32 on cpu)")
    p.add_argument("--attention-slicing", action="store_true", default=None, help="less VRAM, a little slower")
    p.add_argument("--vae-tiling", action="store_true", default=None, help="decode large images tile by tile")
    p.add_argument("--cpu-offload", choices=("model", "sequential"), default=None,
                   help="keep weights in CPU memory, move them to the GPU when used")
    from malerei.commands import edit

    edit.add_hires_options(p)
    p.set_defaults(func=cmd_generate)

    from malerei.commands import listing

    listing.register(sub, _one_line_errors)


# ---------------------------------------------------------------------------------------------
# Jobs: what to generate, before any model is loaded


@dataclass
class Job:
    params: object  # GenerationParams
    pick: int | None = None  # --from a batch: write only this image of the batch
    expect_hash: str | None = None  # --from: the model hash the image was made with


@dataclass
class Plan:
    jobs: list[Job]
    model: str | None
    device: str | None
    dtype: str | None
    memory: dict = field(default_factory=dict)
    hires: dict | None = None  # --from a hires-fix image: its second pass (scale, upscaler, strength, steps)


_OVERRIDES = {  # CLI option -> GenerationParams field
    "negative": "negative_prompt", "sampler": "sampler", "scheduler": "scheduler", "steps": "steps",
    "cfg": "cfg_scale", "seed": "seed", "variation_seed": "subseed", "variation_strength": "subseed_strength",
    "width": "width", "height": "height", "batch": "batch_size", "clip_skip": "clip_skip",
}


def _given(args) -> dict:
    return {field_: getattr(args, opt) for opt, field_ in _OVERRIDES.items() if getattr(args, opt) is not None}


def _read_prompt_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidParameter(f"prompt file {path}: no such file") from None
    except IsADirectoryError:
        raise InvalidParameter(f"prompt file {path}: is a folder, not a text file") from None
    except UnicodeDecodeError:
        raise InvalidParameter(f"prompt file {path}: not UTF-8 text") from None
    except OSError as exc:
        raise InvalidParameter(f"prompt file {path}: cannot read it ({exc.strerror or exc})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InvalidParameter(f"prompt file {path} has no prompts; write one prompt per line")
    return prompts


def _plan_from_image(args) -> Plan:
    """--from IMAGE: the params of the image (malerei recipe, else A1111 infotext), overridden
    by the options given on the command line."""
    from malerei.engine import metadata
    from malerei.engine.pipeline import GenerationParams

    meta = metadata.read_png_metadata(args.from_image)
    given = _given(args)
    if args.prompt is not None:
        given["prompt"] = args.prompt
    recipe = meta.recipe
    if recipe is not None and isinstance(recipe.get("params"), dict):
        params = {k: v for k, v in recipe["params"].items() if k in GenerationParams.__dataclass_fields__}
        if params.get("subseed") is None:
            params["subseed"] = -1
        batch = recipe.get("batch") or {}
        pick = None
        # The exact pixels come from re-running the image's batch (batched arithmetic can differ
        # from a single image's in the last bits), unless the seeds or batch are overridden.
        if batch.get("size", 1) > 1 and not {"seed", "batch_size", "subseed"} & set(given):
            params.update(seed=batch["seed"], batch_size=batch["size"])
            if batch.get("subseed") is not None:
                params["subseed"] = batch["subseed"]
            pick = int(batch["index"])
        hires = recipe.get("hires") if isinstance(recipe.get("hires"), dict) else None
        if hires and isinstance(hires.get("first_pass_size"), list) and len(hires["first_pass_size"]) == 2:
            # The recipe's params are the second pass's (at the target size); the first pass ran here.
            params["width"], params["height"] = (int(v) for v in hires["first_pass_size"])
        model_info = recipe.get("model") or {}
        path = model_info.get("path")
        model_ref = path if path and Path(path).exists() else model_info.get("name")
        job = Job(params=_make_params({**params, **given}), pick=pick, expect_hash=model_info.get("short_hash"))
        memory = recipe.get("memory") or {}
        return Plan(jobs=[job], model=args.model or model_ref, device=args.device or recipe.get("device"),
                    dtype=args.dtype or recipe.get("dtype"), memory=memory,
                    hires=_recorded_hires(hires, job.params.steps))
    if meta.infotext is None:
        raise ImageError(f"{args.from_image} has no generation parameters (no malerei recipe, no A1111 infotext)")
    typed = metadata.infotext_to_params(meta.params)
    params = {k: typed[k] for k in ("prompt", "negative_prompt", "sampler", "scheduler", "steps", "cfg_scale",
                                    "seed", "width", "height", "subseed", "subseed_strength", "clip_skip")
              if k in typed}
    if "prompt" not in params:
        raise ImageError(f"{args.from_image}: its infotext has no prompt")
    job = Job(params=_make_params({**params, **given}), expect_hash=typed.get("model_hash"))
    hires = None
    if typed.get("hires_upscale") is not None:  # A1111 writes the hires fix's second pass this way
        hires = {"scale": typed["hires_upscale"], "upscaler": typed.get("hires_upscaler") or "Latent",
                 "strength": typed.get("denoising_strength"), "steps": typed.get("hires_steps")}
    return Plan(jobs=[job], model=args.model or typed.get("model"), device=args.device, dtype=args.dtype, hires=hires)


def _recorded_hires(hires: dict | None, first_pass_steps: int | None) -> dict | None:
    """The hires-fix options a recipe recorded; its steps only when they differ from the first
    pass's (A1111 writes "Hires steps" only then, and the remake's infotext should match)."""
    if not hires:
        return None
    steps = hires.get("steps")
    return {"scale": hires.get("scale"), "upscaler": hires.get("upscaler"), "strength": hires.get("strength"),
            "steps": steps if steps != first_pass_steps else None}


def _make_params(values: dict):
    from malerei.engine.pipeline import GenerationParams

    values = dict(values)
    values.setdefault("negative_prompt", "")
    if values.get("seed") is None:
        values["seed"] = -1
    if values.get("subseed") is None:
        values["subseed"] = -1
    if values.get("subseed_strength") is None:
        values["subseed_strength"] = 0.0
    if values.get("batch_size") is None:
        values["batch_size"] = 1
    values.setdefault("scheduler", None)
    return GenerationParams(**values)


def plan(args) -> Plan:
    """The jobs this command line asks for; checks everything that needs no model."""
    from malerei.engine import noise
    from malerei.engine.pipeline import check_request

    memory = {"attention_slicing": False, "vae_tiling": False, "cpu_offload": "none"}
    switches = {key: getattr(args, key) for key in memory if getattr(args, key) is not None}
    if args.from_image is not None:
        if args.prompt_file is not None:
            raise InvalidParameter("--from and --prompt-file cannot be combined")
        result = _plan_from_image(args)
        # The image's memory switches (they change the arithmetic a little), unless overridden.
        recorded = {k: v for k, v in result.memory.items() if k in memory}
        result.memory = {**memory, **recorded, **switches}
    else:
        if args.prompt is not None and args.prompt_file is not None:
            raise InvalidParameter("give either a PROMPT or --prompt-file, not both")
        if args.prompt is None and args.prompt_file is None:
            raise InvalidParameter("nothing to generate: give a PROMPT, --prompt-file FILE or --from IMAGE")
        given = _given(args)
        if args.prompt_file is not None:
            prompts = _read_prompt_file(args.prompt_file)
            # One random seed for the whole file, so the lines still get S, S+1, ...
            seed = noise.resolve_seed(given.get("seed", -1))
            step = given.get("batch_size", 1) if isinstance(given.get("batch_size", 1), int) else 1
            jobs = [Job(params=_make_params({**given, "prompt": text, "seed": seed + i * step}))
                    for i, text in enumerate(prompts)]
        else:
            jobs = [Job(params=_make_params({**given, "prompt": args.prompt}))]
        result = Plan(jobs=jobs, model=args.model, device=args.device, dtype=args.dtype,
                      memory={**memory, **switches})
    for job in result.jobs:
        check_request(job.params)
    return result


# ---------------------------------------------------------------------------------------------
# Output files


def next_number(out: Path) -> int:
    """A1111's next sequence number: one more than the highest ``NNNNN-`` prefix in ``out``."""
    highest = -1
    for entry in os.scandir(out):
        match = _NUMBERED.match(entry.name)
        if match:
            highest = max(highest, int(match.group(1)))
    return highest + 1


def reserve_path(out: Path, seed: int) -> Path:
    """A new ``NNNNN-<seed>.png`` in ``out``, created empty (O_EXCL) so nothing is overwritten,
    not even by another malerei writing into the same folder at the same time."""
    number = next_number(out)
    while True:
        path = out / f"{number:05d}-{seed}.png"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            number += 1
            continue
        except OSError as exc:
            raise InvalidParameter(f"cannot write into {out}: {exc.strerror or exc}") from None
        os.close(fd)
        return path


def _prepare_out(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidParameter(f"cannot create output folder {out}: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK):
        raise InvalidParameter(f"output folder {out} is not writable")
    return out


# ---------------------------------------------------------------------------------------------
# Progress (stderr)


def _quiet_libraries() -> None:
    """Library chatter (progress bars, advice) must not reach the terminal around our own lines."""
    import logging
    import warnings

    for key in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(key, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(diffusers|transformers|torch)\b")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    logging.getLogger("malerei").setLevel(logging.WARNING)


class _Progress:
    """A rich progress bar on stderr: one task per job, with sampler steps per second."""

    def __init__(self, jobs: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
        from rich.text import Text

        class StepsPerSecond(ProgressColumn):
            def render(self, task):
                speed = task.finished_speed or task.speed
                return Text(f"{speed:.2f} it/s" if speed else "-- it/s", style="progress.data.speed")

        self.console = Console(stderr=True)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), StepsPerSecond(),
                            TimeElapsedColumn(), console=self.console, transient=True)
        self.jobs = jobs

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def job(self, index: int, seed: int, batch: int):
        label = f"[{index + 1}/{self.jobs}] seed {seed}" + (f" (+{batch - 1})" if batch > 1 else "")
        task = self.bar.add_task(label, total=None)
        started = time.perf_counter()
        steps = {"n": 0}

        def update(step: int, total: int, _latents=None) -> None:
            steps["n"] = step
            self.bar.update(task, completed=step, total=total)

        def done() -> None:
            self.bar.remove_task(task)
            elapsed = time.perf_counter() - started
            rate = steps["n"] / elapsed if elapsed > 0 else 0.0
            self.console.print(f"{label}: {steps['n']} steps in {elapsed:.1f} s ({rate:.2f} it/s)",
                               highlight=False)

        return update, done


# ---------------------------------------------------------------------------------------------
# generate


def _load(plan_: Plan, args):
    from malerei.engine.devices import MemoryOptions
    from malerei.engine.loading import load_model

    memory = MemoryOptions(attention_slicing=bool(plan_.memory.get("attention_slicing")),
                           vae_tiling=bool(plan_.memory.get("vae_tiling")),
                           cpu_offload=plan_.memory.get("cpu_offload") or "none")
    return load_model(plan_.model, models_dir=args.models_dir, allow_pickle=bool(args.allow_pickle),
                      device=plan_.device, dtype=plan_.dtype, memory=memory)


def cmd_generate(args) -> int:
    from malerei.engine.offline import enforce_offline

    enforce_offline()
    jobs = plan(args)
    from malerei.engine.model_dir import resolve_model

    path = resolve_model(jobs.model, args.models_dir)  # a missing model fails here, before heavy imports
    if path.is_file() and path.suffix.lower() == ".safetensors":
        from malerei.engine.checkpoint_files import read_safetensors_header

        read_safetensors_header(path)  # and so does a corrupt or truncated file
    out = _prepare_out(args.out if args.out is not None else DEFAULT_OUT)
    _quiet_libraries()
    import torch

    from malerei.engine import metadata

    from malerei.commands import edit

    if jobs.hires and args.hires_scale is None:
        # --from a hires-fix image: run its second pass too, as recorded (the command line's
        # --hires-* options win when --hires-scale is given).
        recorded = jobs.hires
        args.hires_scale = recorded["scale"]
        args.hires_upscaler = recorded.get("upscaler") or args.hires_upscaler
        if recorded.get("strength") is not None:
            args.hires_strength = float(recorded["strength"])
        if recorded.get("steps") and args.hires_steps is None:
            args.hires_steps = int(recorded["steps"])
    hires = edit.hires_options(args)  # checked before the model loads
    model = _load(jobs, args)
    upscaler = edit.hires_upscaler(hires, args)
    for job in jobs.jobs:
        made_with = (job.expect_hash or "").lower()
        if made_with and not (made_with.startswith(model.short_hash) or model.short_hash.startswith(made_with)):
            print(f"warning: the image was made with model hash {job.expect_hash}, "
                  f"{model.name} has {model.short_hash}: the pixels will differ", file=sys.stderr)
    with _Progress(len(jobs.jobs)) as progress:
        for index, job in enumerate(jobs.jobs):
            update, done = progress.job(index, job.params.seed, job.params.batch_size)
            try:
                results = edit.generate_images(model, job.params, args, upscaler=upscaler, progress=update,
                                               preview_every=0, models_dir=args.models_dir)
            except torch.OutOfMemoryError:
                raise InvalidParameter(
                    f"out of {model.pipe.device.type} memory at {job.params.width or 'default'} x "
                    f"{job.params.height or 'default'}, batch {job.params.batch_size}; try a smaller size or "
                    "batch, --attention-slicing, --vae-tiling or --cpu-offload model") from None
            done()
            for i, result in enumerate(results):
                if job.pick is not None and i != job.pick:
                    continue
                recipe = dict(result.recipe, memory=dict(jobs.memory))
                path = reserve_path(out, result.seed)
                metadata.write_png(result.image, path, infotext=result.infotext, recipe=recipe)
                print(path, flush=True)
    return 0
