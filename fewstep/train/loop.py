"""The training loop every method runs: accelerate for devices, mixed precision and DDP; our own data order,
random draws and checkpoints, so that a run resumed after kill -9, or split over N processes, computes the same
steps as one straight run."""

import json
import logging
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from . import checkpoint
from .config import TrainError, diff_trajectory
from .toolbox import lr_schedule

log = logging.getLogger("fewstep")

# Testing hook: SIGKILL this process right after the given step (and its checkpoint, if any) - a real kill -9 at
# a known point, so that tests can check that a resumed run loses nothing but the steps since the checkpoint.
KILL_AT_STEP = "FEWSTEP_TRAIN_KILL_AT_STEP"


def make_method(cfg, models, device, weight_dtype, autocast):
    from .controlnet import ControlNetTrain
    from .distill import LcmFull, LcmLora
    from .finetune import LoraFinetune

    cls = {"lcm-lora": LcmLora, "lcm": LcmFull, "lora": LoraFinetune, "controlnet": ControlNetTrain}[cfg.method]
    return cls(cfg, models, device, weight_dtype, autocast)


def make_accelerator(cfg):
    from accelerate import Accelerator

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()
                                  and not torch.backends.mps.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda was asked for but this PyTorch build sees no CUDA GPU (use --device cpu)")
    # On CPUs accelerate must be told so: otherwise each launched process trains alone instead of joining the
    # gloo process group.
    acc = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision)
    if acc.mixed_precision == "fp16" and acc.device.type == "cpu":
        raise TrainError("fp16 mixed precision needs a GPU: use --mixed-precision bf16 (or no) on the CPU")
    return acc


def lr_at(cfg, step):
    """Learning rate of optimizer step `step` (0-based): linear warmup, then constant or cosine to zero."""
    return lr_schedule(step, base=cfg.lr, total=cfg.max_steps, warmup=cfg.lr_warmup, kind=cfg.lr_schedule)


def record(cfg, acc, models):
    """What reproduces a run: the settings, the versions and the command line."""
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return dict(fewstep_version=__version__, command=sys.argv, arch=models.arch, processes=acc.num_processes,
                global_batch=cfg.batch_size * acc.num_processes * cfg.grad_accum, device=str(acc.device),
                mixed_precision=acc.mixed_precision,
                versions={n: v(n) for n in ("torch", "diffusers", "transformers", "accelerate", "peft")},
                config=cfg.record())


def run(cfg, *, source=None):
    """Train as `cfg` says; returns the path of the result."""
    from .data import Loader, open_source
    from .models import load_models, place_frozen, torch_dtype

    acc = make_accelerator(cfg)
    main = acc.is_main_process
    out = Path(cfg.out)
    weight_dtype = torch_dtype(acc.mixed_precision)
    device = acc.device
    found = checkpoint.find(out, cfg.resume)  # checked before the (slow) model load
    if not cfg.resume and checkpoint.checkpoints(out):
        raise TrainError(f"{out} holds checkpoints of an earlier run: pass --resume to continue it, or pick another "
                         "--out")

    torch.manual_seed(cfg.seed)  # the LoRA's initial A matrices (identical on every process)
    with acc.main_process_first():  # a hub download happens once, then the other processes read the cache
        models = load_models(cfg.model, allow_pickle=cfg.allow_pickle, vae=cfg.vae)
    cfg = cfg.resolved(xl=models.preset.xl, native_size=models.native_size)
    if cfg.resolution % models.vae_factor:
        raise TrainError(f"--resolution {cfg.resolution} is not a multiple of this model's latent factor "
                         f"{models.vae_factor}")
    if found is not None:
        changed = diff_trajectory(checkpoint.read_record(found), cfg.record())
        if changed:
            raise TrainError(f"--resume {found}: that run used other {', '.join(changed)}; resume with the same "
                             "settings (or start a new --out)")
    controlnet = cfg.method == "controlnet"
    data = open_source(source if source is not None else cfg.data, conditioning=controlnet)
    place_frozen(models, device, weight_dtype, custom_vae=cfg.vae is not None)
    method = make_method(cfg, models, device, weight_dtype, acc.autocast)
    if cfg.gradient_checkpointing:
        method.student.enable_gradient_checkpointing()
    params = method.trainable()
    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg.weight_decay)
    student, opt = acc.prepare(method.student, optimizer)
    gen = torch.Generator().manual_seed(cfg.seed)  # every random draw of the steps, on the CPU: any device agrees

    meta = record(cfg, acc, models)
    step, position = 0, 0
    say = (lambda msg: print(f"fewstep: {msg}", file=sys.stderr)) if main and not cfg.quiet else (lambda msg: None)
    if cfg.resume and found is None:
        say(f"--resume: no checkpoint in {checkpoint.folder(out)} yet, starting at step 0")
    if found is not None:
        res = checkpoint.load(found, params=params, optimizer=opt, generator=gen, scaler=acc.scaler)
        method.load_extra_state(res.extra)
        step, position = res.step, res.position
        say(f"resumed from {found} at step {step}")

    loader = Loader(data, seed=cfg.seed, resolution=cfg.resolution, per_process=cfg.batch_size,
                    processes=acc.num_processes, rank=acc.process_index, crop=cfg.crop, flip=cfg.flip,
                    caption_dropout=cfg.caption_dropout if cfg.method in ("lora", "controlnet") else 0.0,
                    workers=cfg.num_workers, conditioning=controlnet)
    prompts = list(cfg.validation_prompts) or loader.captions(2) or [""]
    if controlnet:  # a control image per prompt: the data's first ones, in turn
        controls = loader.conditionings(2)
        prompts = [(p, controls[i % len(controls)]) for i, p in enumerate(prompts)] if controls else []
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(meta, indent=1))
        _trim_log(out / "log.jsonl", step)
    acc.wait_for_everyone()

    g_batch = loader.global_batch
    lo, hi = acc.process_index * cfg.batch_size, (acc.process_index + 1) * cfg.batch_size
    bar = None
    if main and not cfg.quiet:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train {cfg.method}", unit="step", file=sys.stderr,
                   dynamic_ncols=True)
    kill_at = int(os.environ.get(KILL_AT_STEP, "0") or 0)
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            total = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                batch = loader.batch(position)
                draws = {k: v[lo:hi] for k, v in method.draw(gen, g_batch).items()}
                position += g_batch
                sync = micro == cfg.grad_accum - 1
                with nullcontext() if sync else acc.no_sync(student):
                    loss = method.loss(student, batch, draws)
                    acc.backward(loss / cfg.grad_accum)
                total += loss.detach() / cfg.grad_accum
            loss_value = acc.reduce(total, "mean").item()  # the same on every process: all stop together
            if not math.isfinite(loss_value):
                raise TrainError(f"the loss is {loss_value} at step {step + 1}: lower --lr, or use bf16 instead of "
                                 "fp16 (and the fp16-safe VAE for SDXL)")
            acc.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            method.after_step()
            step += 1
            dt = time.perf_counter() - t0
            if main:
                speed = g_batch * cfg.grad_accum / dt
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(dict(step=step, loss=loss_value, lr=lr, images_per_s=round(speed, 3),
                                            seconds=round(dt, 4))) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_value:.4g}", img_s=f"{speed:.3g}", lr=f"{lr:.2g}", refresh=False)
                    bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                if main:
                    # LoRA (and ControlNet) checkpoints also hold the result as a loadable file or folder
                    also = None if cfg.method == "lcm" else (lambda d: method.export(d, file_meta(cfg, models, step)))
                    checkpoint.save(out, step=step, position=position, params=params, optimizer=opt, generator=gen,
                                    scaler=acc.scaler, extra=method.extra_state(), record=cfg.record(),
                                    keep=cfg.keep_checkpoints, also=also)
                acc.wait_for_everyone()
            if cfg.validate_every and step % cfg.validate_every == 0 and step < cfg.max_steps:
                _validate(method, cfg, acc, step, prompts, out)
            if kill_at and step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        loader.close()
        if bar is not None:
            bar.close()

    if cfg.validate_every:
        _validate(method, cfg, acc, step, prompts, out)
    result = None
    if main:
        result = method.export(out, file_meta(cfg, models, step))
    acc.wait_for_everyone()
    acc.end_training()
    if acc.num_processes == 1:
        _release_accelerate()
    return result if result is not None else _result_path(cfg, out)


def _release_accelerate():
    """Let a later run in this process pick other settings (accelerate keeps one global state per process and
    refuses a second Accelerator with, say, another mixed precision). Its own tests reset it the same way."""
    from accelerate.state import AcceleratorState, GradientState

    for state in (AcceleratorState, GradientState):
        reset = getattr(state, "_reset_state", None)
        if reset is not None:
            reset()


def file_meta(cfg, models, step):
    """Metadata stored in the result's safetensors header (what made it)."""
    from .. import __version__

    meta = dict(fewstep_version=__version__, method=cfg.method, base_model=cfg.model, arch=models.arch, steps=step,
                resolution=cfg.resolution)
    if cfg.method in ("lcm-lora", "lora"):
        meta.update(rank=cfg.rank, alpha=cfg.lora_alpha, targets=cfg.targets)
    return meta


def _validate(method, cfg, acc, step, prompts, out):
    from .validate import validate

    if acc.is_main_process:
        validate(method, cfg, step=step, prompts=prompts, out=out)
    acc.wait_for_everyone()


def _result_path(cfg, out):
    from .models import LORA_FILE

    return out if cfg.method in ("lcm", "controlnet") else out / LORA_FILE


def _trim_log(path, step):
    """Drop log lines after the resumed step (they belong to the steps that the kill lost)."""
    if step == 0:
        path.unlink(missing_ok=True)
        return
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in keep))
