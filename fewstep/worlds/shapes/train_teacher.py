"""Train the shapes teacher from a seed (issue 5): VAE, then a text-encoder warm start, then UNet + text encoder.

    python3 -m fewstep.worlds.shapes.train_teacher --out runs/teacher --device cuda --minutes 6

Stages, each resumable from <out>/checkpoints/ (rerun the same command to continue; --fresh starts over):
1. vae:  AutoencoderKL on every image of the world (840 filled + 840 outlined, pre-rendered once, on the device):
         L1 + MSE reconstruction and a small KL; then its latent scaling factor (1 / std, as SD's 0.18215).
2. text: the CLIP text encoder learns to parse captions: linear heads read colour, shape, position, background and
         style from every end/pad token (the tokens that see the whole caption under CLIP's causal mask). Seconds of
         work that spare the UNet from discovering the text through the diffusion loss alone.
3. unet: the epsilon loss on latents (min-SNR-5 weighting, 10% empty captions for classifier-free guidance) trains
         the UNet and the text encoder together, the parse heads kept as a small auxiliary loss; EMA weights are
         evaluated: fewstep's engine generates fixed captions (Euler, 25 steps) and the detectors score them.
Outputs in --out: model/ (StableDiffusionPipeline folder, fp16 safetensors, EMA weights), train.log,
accuracy.json (every evaluation, the plan and the command), samples.png, checkpoints/ (the resume state, in the
trainer's format: fewstep.train.checkpoint).

With --minutes, step counts are planned from the measured speed (logged, with a command that reproduces the run
without a time budget); without it they come from --vae-steps / --unet-steps. A budget that ends inside the UNet
stage still exports the model as it is then. --extend trains a finished teacher further (a new UNet segment).
"""

import argparse
import copy
import json
import logging
import math
import shlex
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import FewstepError
from ...train import checkpoint
from ...train.config import TrainError
from ...train.toolbox import ema_update, lr_schedule, min_snr_weight
from . import teacher as tarch
from .detect import detect
from .evaluate import EVAL_SEED, evaluate, mistakes
from .world import COLORS, POSITIONS, SHAPES, all_attributes, caption, render_array

log = logging.getLogger("fewstep.shapes.teacher")
T_START = time.monotonic()

STAGES = ("vae", "text", "unet", "done")
VAE_SHARE = 0.15  # of a --minutes budget; the text stage takes seconds, the UNet the rest
KL_WEIGHT = 1e-4  # per latent element, against per-pixel L1 + MSE: a smooth latent that still keeps 3 px outlines
CFG_DROP = 0.1
MIN_SNR = 5.0  # Hang et al. 2023: weight min(SNR, 5) / SNR on the epsilon loss, faster convergence
AUX_WEIGHT = 0.1
EMA_DECAY = 0.999
PROBE = (5, 25)  # steps (from a stage's start or resume) between which it measures its speed to plan its length
EVAL_S_PER_CAPTION = {"cuda": 0.025, "cpu": 0.6}  # until measured: Euler 25 steps with CFG, decode, detect
HEADS = (("color", COLORS), ("shape", SHAPES), ("position", tuple(POSITIONS)), ("background", COLORS),
         ("outline", (False, True)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python3 -m fewstep.worlds.shapes.train_teacher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (model/, train.log, accuracy.json, checkpoints/)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget of this invocation, start-up to saved model; steps are planned to fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image side (the latent is size/4)")
    p.add_argument("--batch", type=int, default=None, help="UNet batch (default 512 on CUDA, 64 on CPU)")
    p.add_argument("--vae-batch", type=int, default=None, help="VAE batch (default 128 on CUDA, 32 on CPU)")
    p.add_argument("--vae-steps", type=int, default=None, help="VAE steps (default: planned, or 3000)")
    p.add_argument("--text-steps", type=int, default=400, help="most text warm-start steps (stops at 100%%)")
    p.add_argument("--unet-steps", type=int, default=None, help="UNet steps (default: planned, or 20000)")
    p.add_argument("--lr", type=float, default=5e-4, help="UNet and text encoder learning rate")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--text-lr", type=float, default=2e-3, help="text warm-start learning rate")
    p.add_argument("--guidance", type=float, default=4.0, help="CFG scale of the evaluations")
    p.add_argument("--eval-steps", type=int, default=25, help="Euler steps of the evaluations")
    p.add_argument("--eval-n", type=int, default=None, help="captions per evaluation (default 200 CUDA, 16 CPU)")
    p.add_argument("--vae-check-n", type=int, default=None,
                   help="images whose reconstruction is checked after the VAE stage (default 560 CUDA, 64 CPU)")
    p.add_argument("--evals", type=int, default=4, help="evaluations during the UNet stage (the last is final)")
    p.add_argument("--sweep", default=None,
                   help="comma-separated guidance scales evaluated at the end (default 1,2,4,7.5 on CUDA, none on CPU)")
    p.add_argument("--amp", choices=("auto", "bf16", "none"), default="auto",
                   help="autocast dtype for training (auto: bf16 on CUDA, none on CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--ckpt", default=None, help="folder whose checkpoints/ holds the resume state (default --out; "
                                                "~150 MB)")
    p.add_argument("--ckpt-every", type=float, default=120.0, help="seconds between checkpoints")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--extend", action="store_true",
                   help="train a finished teacher further: a new UNet segment (fresh learning-rate schedule) of "
                        "--unet-steps more steps, or as many as --minutes allows")
    args = p.parse_args(argv)
    if args.minutes is not None and args.minutes <= 0:
        p.error("--minutes must be positive")
    return args


# ---- small helpers ------------------------------------------------------------------------------------------------

class Clock:
    """The invocation's deadline; stages ask it how much time is left."""

    def __init__(self, minutes, start):
        self.start = start
        self.deadline = None if minutes is None else start + 60.0 * minutes

    def elapsed(self):
        return time.monotonic() - self.start

    def left(self):
        return math.inf if self.deadline is None else self.deadline - time.monotonic()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_lr(opt, step, total, base, warmup):
    """Linear warm-up, then cosine decay to 10% of base at `total`."""
    lr = lr_schedule(step, base=base, total=total, warmup=warmup, floor=0.1)
    for g in opt.param_groups:
        g["lr"] = lr


def images_tensor(attrs, size, device):
    """uint8 (n, 3, size, size) on the device; the renderer runs once, vectorised."""
    return torch.from_numpy(render_array(attrs, size)).permute(0, 3, 1, 2).contiguous().to(device)


def to_unit(x_uint8):
    return x_uint8.float() / 127.5 - 1.0


def plan_steps(now, measured_s, budget_s, hi):
    """The step a stage should end at: `now` plus what `budget_s` buys at `measured_s` a step (at least one more)."""
    return now + int(max(1, min(hi, budget_s / max(measured_s, 1e-6))))


class SpeedProbe:
    """Seconds per step of a stage, measured between the PROBE steps counted from where the stage (re)starts."""

    def __init__(self, device, start):
        self.device, self.steps, self.t0 = device, [start + k for k in PROBE], None

    def tick(self, step):
        """Call after each step; returns the seconds per step once, after the probe's last step, else None."""
        if step not in self.steps:
            return None
        sync(self.device)
        if step == self.steps[0]:
            self.t0 = time.monotonic()
            return None
        return (time.monotonic() - self.t0) / (self.steps[1] - self.steps[0])


def tokenize(tokenizer, captions, device):
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


def label_tensor(attrs, device):
    """(n, 5) class indices: colour, shape, position, background, outline."""
    rows = [[names.index(getattr(a, key)) for key, names in HEADS] for a in attrs]
    return torch.tensor(rows, dtype=torch.long, device=device)


def parse_loss(states, ids, labels, heads, eos_id):
    """Cross-entropy of the parse heads at every end/pad token (those see the whole caption); and accuracy."""
    mask = (ids == eos_id).float()  # the pad token is the end token
    logits = heads(states.float())
    loss, correct, start = 0.0, None, 0
    for j, (_, names) in enumerate(HEADS):
        lg = logits[..., start:start + len(names)]
        start += len(names)
        target = labels[:, j:j + 1].expand(-1, ids.shape[1])
        ce = F.cross_entropy(lg.reshape(-1, len(names)), target.reshape(-1), reduction="none").view_as(mask)
        loss = loss + (ce * mask).sum() / mask.sum()
        ok = (lg.argmax(-1) == target) | (mask == 0)
        correct = ok.all(1) if correct is None else correct & ok.all(1)
    return loss, correct.float().mean()


# ---- the trainer --------------------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, args, start=None):
        self.args = args
        self.out = Path(args.out)
        self.ckpt_root = Path(args.ckpt) if args.ckpt else self.out  # checkpoints in <root>/checkpoints/
        from ...loading import resolve_device
        from ...tokenizers import bundled_tokenizer

        self.device = resolve_device(args.device)
        cuda = self.device.type == "cuda"
        amp = args.amp if args.amp != "auto" else ("bf16" if cuda else "none")
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=amp == "bf16")
        self.batch = args.batch or (512 if cuda else 64)
        self.vae_batch = args.vae_batch or (128 if cuda else 32)
        self.eval_n = args.eval_n or (200 if cuda else 16)
        self.vae_check_n = min(args.vae_check_n or (560 if cuda else 64), 2 * 840)
        sweep = args.sweep if args.sweep is not None else ("1,2,4,7.5" if cuda else "")
        self.sweep = [float(g) for g in sweep.split(",") if g.strip()]
        self.clock = Clock(args.minutes, T_START if start is None else start)
        self.cfg = tarch.TeacherConfig(size=args.size)
        self.tokenizer = bundled_tokenizer("clip")
        self.eos_id = self.tokenizer.eos_token_id
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

        torch.manual_seed(args.seed)
        self.vae, self.te, self.unet = (m.to(self.device) for m in tarch.build(self.cfg, args.seed))
        n_classes = sum(len(names) for _, names in HEADS)
        self.heads = torch.nn.Linear(self.cfg.text_hidden, n_classes).to(self.device)
        stages = STAGES[:-1]
        self.state = dict(stage="vae", steps={s: 0 for s in stages}, plan={}, seconds={s: 0.0 for s in stages},
                          history=[], results={}, scaling_factor=None, invocations=[])
        self.opt = None
        self.ema = None
        self._resume = None  # the checkpoint resumed from, until its optimizer and EMA state are restored
        self._stale = []  # checkpoints of an earlier run that --fresh replaces
        self.last_ckpt = time.monotonic()

        filled, outlined = all_attributes(False), all_attributes(True)
        self.filled = filled
        self.images = images_tensor(filled + outlined, args.size, self.device)  # VAE data: both styles
        self.all_attrs = filled + outlined
        self.ids = tokenize(self.tokenizer, [caption(a) for a in self.all_attrs], self.device)
        self.labels = label_tensor(self.all_attrs, self.device)
        self.empty_ids = tokenize(self.tokenizer, [""], self.device)

    # ---- checkpoints: fewstep.train.checkpoint's (safetensors, weights-only optimizer state, written atomically) --
    def networks(self):
        """{name: tensor} of the trained networks' states (views: a checkpoint loads into them in place)."""
        return {f"{name}.{k}": v for name in ("vae", "te", "unet", "heads")
                for k, v in getattr(self, name).state_dict().items()}

    def ema_named(self):
        return {f"ema.{name}.{k}": p for name in ("te", "unet")
                for k, p in getattr(self, f"ema_{name}").named_parameters()}

    def record(self):
        """What a checkpoint must have been made with to be resumed here (as its JSON reads back: lists, not tuples)."""
        return json.loads(json.dumps(dict(config=asdict(self.cfg), seed=self.args.seed)))

    def save_ckpt(self):
        done = self.state["stage"] == "done"  # then no optimizer state: half the size, and --extend starts afresh
        extra = dict(self.ema_named()) if self.ema is not None else {}
        if self.device.type == "cuda":
            extra["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        for path in self._stale:  # before saving: the newest step number is what a checkpoint folder keeps
            shutil.rmtree(path, ignore_errors=True)
        self._stale = []
        # the step counts every stage's steps, so that a later checkpoint always has a higher number
        path = checkpoint.save(self.ckpt_root, step=sum(self.state["steps"].values()), position=0,
                               params=self.networks(), optimizer=None if done else self.opt,
                               generator=torch.default_generator, extra=extra, record=self.record(), info=self.state,
                               keep=1)
        self.last_ckpt = time.monotonic()
        log.info("checkpoint %s (stage %s, steps %s)", path, self.state["stage"], self.state["steps"])

    def maybe_ckpt(self):
        if time.monotonic() - self.last_ckpt > self.args.ckpt_every:
            self.save_ckpt()

    def load_ckpt(self):
        found = checkpoint.find(self.ckpt_root, "latest")
        if found is None:
            return False
        if self.args.fresh:
            self._stale = checkpoint.checkpoints(self.ckpt_root)
            return False
        saved = checkpoint.read_record(found)
        if saved != self.record():
            raise TrainError(f"{found} was made with another seed or size ({saved.get('seed')}, "
                             f"{saved.get('config', {}).get('size')}): use another --out, or --fresh to start over")
        res = checkpoint.load(found, params=self.networks(), optimizer=None, generator=torch.default_generator)
        self.state = res.info
        if "rng.cuda" in res.extra and self.device.type == "cuda":
            torch.cuda.set_rng_state(res.extra["rng.cuda"], self.device)
        if self.state["scaling_factor"] is not None:
            self.vae.register_to_config(scaling_factor=self.state["scaling_factor"])
        self._resume = res
        log.info("resumed from %s: stage %s, steps %s", found, self.state["stage"], self.state["steps"])
        return True

    def _restore_opt(self):
        """The resumed stage's optimizer state (a checkpoint holds only the optimizer of the stage it was in)."""
        if self._resume is None:
            return
        opt_state = checkpoint.optimizer_state(self._resume.path)
        if opt_state is not None:
            self.opt.load_state_dict(opt_state)
        self._resume = None

    # ---- the run --------------------------------------------------------------------------------------------------
    def run(self):
        self.load_ckpt()
        st = self.state
        if self.args.extend:
            if st["stage"] != "done":
                raise TrainError(f"--extend continues a finished teacher; {self.ckpt_root} holds one in stage "
                                 f"{st['stage']}: rerun without --extend to finish it first")
            if not (self.args.unet_steps or self.args.minutes):
                raise TrainError("--extend needs --unet-steps (how many more) or --minutes (a budget to plan them)")
            st["stage"] = "unet"
            st["plan"]["unet_from"] = st["steps"]["unet"]
            st["plan"]["unet"] = st["steps"]["unet"] + self.args.unet_steps if self.args.unet_steps else None
            log.info("extending the UNet stage from step %d (%s)", st["steps"]["unet"],
                     f"{self.args.unet_steps} more steps" if self.args.unet_steps else "planned from --minutes")
        self.state["invocations"].append(dict(args=vars(self.args), device=str(self.device),
                                              gpu=torch.cuda.get_device_name(self.device)
                                              if self.device.type == "cuda" else None,
                                              torch=torch.__version__, minutes=self.args.minutes))
        log.info("device %s, amp %s, batch %d (vae %d), budget %s min, start-up %.1f s", self.device,
                 "bf16" if self.autocast["enabled"] else "off", self.batch, self.vae_batch, self.args.minutes,
                 self.clock.elapsed())
        log.info("parameters (millions): vae %.2f, text encoder %.2f, unet %.2f",
                 *(sum(p.numel() for p in m.parameters()) / 1e6 for m in (self.vae, self.te, self.unet)))
        if STAGES.index(self.state["stage"]) > 0:
            self.vae.eval().requires_grad_(False)
        try:
            for stage, fn in (("vae", self.train_vae), ("text", self.train_text), ("unet", self.train_unet)):
                if STAGES.index(self.state["stage"]) > STAGES.index(stage):
                    continue
                t0 = time.monotonic()
                finished = fn()
                self.state["seconds"][stage] += time.monotonic() - t0
                if not finished:
                    self.save_ckpt()
                    if stage == "unet":  # a budgeted run always leaves a usable model
                        self.finish(partial=True)
                        return 0
                    log.info("time budget spent in stage %s: rerun the same command to continue", stage)
                    self.write_json()
                    return 1
                self.state["stage"] = STAGES[STAGES.index(stage) + 1]
                self.opt = None
                self.save_ckpt()
            self.state["stage"] = "done"
            self.finish()
            return 0
        except KeyboardInterrupt:
            self.save_ckpt()
            log.info("interrupted: state saved, rerun to continue")
            return 130

    # ---- stage 1: VAE ---------------------------------------------------------------------------------------------
    def vae_step(self, step, total):
        idx = torch.randint(len(self.images), (self.vae_batch,), device=self.device)
        x = to_unit(self.images[idx])
        set_lr(self.opt, step, total, self.args.vae_lr, warmup=min(100, total // 10 + 1))
        with torch.autocast(**self.autocast):
            post = self.vae.encode(x).latent_dist
            rec = self.vae.decode(post.sample()).sample.float()
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        mean, logvar = post.mean.float(), post.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()  # per latent element, in float32
        loss = rec_loss + KL_WEIGHT * kl
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
        self.opt.step()
        return loss.detach(), rec_loss.detach()

    def train_vae(self):
        a, st = self.args, self.state
        self.vae.train()
        self.opt = torch.optim.AdamW(self.vae.parameters(), lr=a.vae_lr, weight_decay=0.0,
                                     fused=self.device.type == "cuda")
        self._restore_opt()
        total = st["plan"].get("vae") or a.vae_steps or (None if a.minutes else 3000)
        probe, t_stage = SpeedProbe(self.device, st["steps"]["vae"]), time.monotonic()
        while total is None or st["steps"]["vae"] < total:
            step = st["steps"]["vae"]
            if self.clock.left() < 0.5 * self.reserve():
                return False
            loss, rec = self.vae_step(step, total or 10**9)
            st["steps"]["vae"] += 1
            per = probe.tick(step) if total is None else None
            if per is not None:
                budget = VAE_SHARE * 60.0 * a.minutes - (time.monotonic() - t_stage)
                total = st["plan"]["vae"] = plan_steps(step + 1, per, budget, 20000)
                log.info("vae: %.1f ms/step -> %d steps planned", per * 1e3, total)
            if step % 200 == 0 or step + 1 == total:
                log.info("vae step %d/%s loss %.4f rec %.4f", step, total, float(loss), float(rec))
            self.maybe_ckpt()
        st["plan"]["vae"] = total
        self.vae.eval().requires_grad_(False)
        self.finish_vae()
        return True

    @torch.no_grad()
    def finish_vae(self):
        """Scaling factor from the latents' std (as SD's 0.18215) and the reconstruction check on every image."""
        samples, detected, err = [], [], []
        # an even spread over both styles (the first half of self.images is filled, the second outlined)
        pick = np.unique(np.linspace(0, len(self.images) - 1, self.vae_check_n).round().astype(np.int64))
        expected = [self.all_attrs[i] for i in pick]
        pick_t = torch.from_numpy(pick).to(self.device)
        for i in range(0, len(pick), 256):
            x = to_unit(self.images[pick_t[i:i + 256]])
            post = self.vae.encode(x).latent_dist
            samples.append(post.sample().float())
            rec = self.vae.decode(post.mean).sample.float()
            err.append((rec - x).abs().mean((1, 2, 3)) * 127.5)
            rec_u8 = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            detected.extend(detect(im) for im in rec_u8)
        z = torch.cat(samples)
        sf = float(1.0 / z.std())
        self.state["scaling_factor"] = sf
        self.vae.register_to_config(scaling_factor=sf)
        ok = np.array([e == d for e, d in zip(expected, detected)])
        outlined = np.array([e.outline for e in expected])
        res = dict(scaling_factor=sf, latent_mean=float(z.mean() * sf), checked=len(pick),
                   recon_detected=float(ok.mean()), recon_detected_filled=float(ok[~outlined].mean()),
                   recon_detected_outline=float(ok[outlined].mean()),
                   mean_abs_error_255=float(torch.cat(err).mean()), steps=self.state["steps"]["vae"])
        self.state["results"]["vae"] = res
        log.info("vae done: %s", json.dumps(res))

    # ---- stage 2: text warm start ---------------------------------------------------------------------------------
    def train_text(self):
        a, st = self.args, self.state
        self.te.train()
        params = list(self.te.parameters()) + list(self.heads.parameters())
        self.opt = torch.optim.AdamW(params, lr=a.text_lr, weight_decay=0.0)
        self._restore_opt()
        batch = min(256, self.batch)
        acc = 0.0
        while st["steps"]["text"] < a.text_steps:
            step = st["steps"]["text"]
            if self.clock.left() < self.reserve():
                return False
            idx = torch.randint(len(self.ids), (batch,), device=self.device)
            set_lr(self.opt, step, a.text_steps, a.text_lr, warmup=20)
            with torch.autocast(**self.autocast):
                states = self.te(self.ids[idx]).last_hidden_state
            loss, _ = parse_loss(states, self.ids[idx], self.labels[idx], self.heads, self.eos_id)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            st["steps"]["text"] += 1
            if step % 25 == 24:
                acc = self.parse_accuracy()
                log.info("text step %d loss %.4f parse accuracy (all 1680 captions) %.4f", step, loss.item(), acc)
                if acc == 1.0:
                    break
        st["results"]["text"] = dict(parse_accuracy=self.parse_accuracy(), steps=st["steps"]["text"])
        log.info("text done: %s", json.dumps(st["results"]["text"]))
        return True

    @torch.no_grad()
    def parse_accuracy(self):
        with torch.autocast(**self.autocast):
            states = self.te(self.ids).last_hidden_state
        return float(parse_loss(states, self.ids, self.labels, self.heads, self.eos_id)[1])

    # ---- stage 3: UNet + text encoder ----------------------------------------------------------------------------
    @torch.no_grad()
    def latent_stats(self):
        """Posterior mean and std of the 840 filled images: training samples latents without running the VAE."""
        means, stds = [], []
        for i in range(0, len(self.filled), 256):
            post = self.vae.encode(to_unit(self.images[i:min(i + 256, len(self.filled))])).latent_dist
            means.append(post.mean.float())
            stds.append(post.std.float())
        return torch.cat(means), torch.cat(stds)

    def unet_step(self, step, total, mu, sd, alphas):
        a, B, dev = self.args, self.batch, self.device
        n = len(self.filled)
        idx = torch.randint(n, (B,), device=dev)
        lat = (mu[idx] + sd[idx] * torch.randn_like(mu[idx])) * self.state["scaling_factor"]
        noise = torch.randn_like(lat)
        t = torch.randint(0, len(alphas), (B,), device=dev)
        ab = alphas[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * lat + (1 - ab).sqrt() * noise
        drop = torch.rand(B, device=dev) < CFG_DROP
        ids = torch.where(drop[:, None], self.empty_ids, self.ids[idx])
        aux_idx = torch.randint(len(self.ids), (min(B, 128),), device=dev)  # both styles: the encoder keeps parsing
        set_lr(self.opt, step, total, a.lr, warmup=min(300, total // 10 + 1))
        with torch.autocast(**self.autocast):
            states = self.te(ids).last_hidden_state
            pred = self.unet(xt, t, encoder_hidden_states=states).sample.float()
            aux_states = self.te(self.ids[aux_idx]).last_hidden_state
        eps_loss = (min_snr_weight(ab.view(-1), MIN_SNR) * (pred - noise).pow(2).mean((1, 2, 3))).mean()
        aux, _ = parse_loss(aux_states, self.ids[aux_idx], self.labels[aux_idx], self.heads, self.eos_id)
        loss = eps_loss + AUX_WEIGHT * aux
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.train_params, 1.0)
        self.opt.step()
        ema_update(self.ema, self.ema_src, min(EMA_DECAY, (1 + step) / (10 + step)))
        return eps_loss.detach(), aux.detach()

    def make_ema(self):
        """EMA copies of the text encoder and UNet (what is evaluated and saved), restored from a checkpoint."""
        if self.ema is not None:
            return
        self.ema_te, self.ema_unet = copy.deepcopy(self.te).eval(), copy.deepcopy(self.unet).eval()
        self.ema_te.requires_grad_(False)
        self.ema_unet.requires_grad_(False)
        self.ema_src = list(self.te.parameters()) + list(self.unet.parameters())
        self.ema = list(self.ema_te.parameters()) + list(self.ema_unet.parameters())
        saved = self._resume.extra if self._resume is not None else {}
        with torch.no_grad():
            for name, e in self.ema_named().items():
                if name in saved:
                    e.copy_(saved[name].to(e.device))

    def train_unet(self):
        from ...schedules import noise_schedule

        a, st = self.args, self.state
        self.te.train()
        self.unet.train()
        mu, sd = self.latent_stats()
        alphas = noise_schedule(tarch.SCHEDULER).alphas_cumprod.to(self.device)
        self.train_params = list(self.unet.parameters()) + list(self.te.parameters()) + list(self.heads.parameters())
        self.opt = torch.optim.AdamW(self.train_params, lr=a.lr, betas=(0.9, 0.99), weight_decay=0.0,
                                     fused=self.device.type == "cuda")
        self.make_ema()
        self._restore_opt()
        first = st["plan"].get("unet_from", 0)  # where this segment's learning-rate schedule starts (--extend)
        total = st["plan"].get("unet") or (a.unet_steps if not first else None) or (None if a.minutes else 20000)
        probe = SpeedProbe(self.device, st["steps"]["unet"])

        def evals_at(total):
            return {first + int((total - first) * k / a.evals) for k in range(1, a.evals)}

        eval_at = evals_at(total) if total is not None else set()
        acc_loss = torch.zeros(2, device=self.device)
        n_acc = 0
        while total is None or st["steps"]["unet"] < total:
            step = st["steps"]["unet"]
            if self.clock.left() < self.reserve():
                return False
            eps_l, aux_l = self.unet_step(step - first, (total or 10**9) - first, mu, sd, alphas)
            acc_loss += torch.stack([eps_l, aux_l])
            n_acc += 1
            st["steps"]["unet"] += 1
            per = probe.tick(step) if total is None else None
            if per is not None:
                evals_s = (a.evals - 1) * self.eval_seconds_estimate(self.eval_n // 2)
                # 3% for checkpoints and logging
                budget = 0.97 * (self.clock.left() - self.reserve()) - evals_s
                total = st["plan"]["unet"] = plan_steps(step + 1, per, budget, 10**6)
                eval_at = evals_at(total)
                log.info("unet: %.1f ms/step at batch %d -> %d steps planned (%.0f s for evaluations)",
                         per * 1e3, self.batch, total, evals_s)
            if step % 250 == 0 or step + 1 == total:
                l_eps, l_aux = (acc_loss / max(n_acc, 1)).tolist()
                acc_loss.zero_()
                n_acc = 0
                log.info("unet step %d/%s eps loss %.4f parse loss %.4f lr %.2e", step, total, l_eps, l_aux,
                         self.opt.param_groups[0]["lr"])
            if st["steps"]["unet"] in eval_at:
                self.evaluate_now(self.eval_n // 2 or 1)
                self.te.train()
                self.unet.train()
            self.maybe_ckpt()
        st["plan"]["unet"] = total
        return True

    # ---- evaluation -----------------------------------------------------------------------------------------------
    def engine(self, dtype=torch.float32):
        """A fewstep Engine over the EMA weights (in memory: what the saved folder will hold)."""
        from ...engine import Engine
        from ...loading import Components

        comps = Components(arch="shapes", unet=self.ema_unet, vae=self.vae, text_encoders=[self.ema_te],
                           tokenizers=[self.tokenizer], scheduler_config=dict(tarch.SCHEDULER), source="training",
                           name=tarch.MODEL_NAME)
        return Engine(comps, self.device, dtype)

    def eval_seconds_estimate(self, n):
        per = self.state.get("eval_s_per_caption") or EVAL_S_PER_CAPTION.get(self.device.type, 0.6)
        return 2.0 + per * n

    def reserve(self):
        """Seconds kept for the final evaluation(s) and the export."""
        if self.clock.deadline is None:
            return 0.0
        n_final = 1 + len([g for g in self.sweep if g != self.args.guidance])
        return 10.0 + n_final * self.eval_seconds_estimate(self.eval_n)

    @torch.no_grad()
    def evaluate_now(self, n, guidance=None, record=True):
        t0 = time.monotonic()
        g = self.args.guidance if guidance is None else guidance
        logging.getLogger("fewstep").setLevel(logging.ERROR)  # no per-request warnings in the training log
        metrics, images, attrs, detected = evaluate(self.engine(), n, sampler="euler", steps=self.args.eval_steps,
                                                    guidance=g, batch=100)
        dt = time.monotonic() - t0
        self.state["eval_s_per_caption"] = dt / n
        row = dict(step=self.state["steps"]["unet"], seconds=round(self.clock.elapsed(), 1),
                   guidance=g, steps=self.args.eval_steps, **metrics)
        if record:
            self.state["history"].append(row)
        log.info("eval (Euler %d, guidance %g, %d captions, %.1f s): all-four %.3f | colour %.3f shape %.3f "
                 "position %.3f background %.3f", self.args.eval_steps, g, n, dt, metrics["all"], metrics["color"],
                 metrics["shape"], metrics["position"], metrics["background"])
        return row, images, attrs, detected

    # ---- the end --------------------------------------------------------------------------------------------------
    def finish(self, partial=False):
        """Final evaluation(s), samples, the model folder and accuracy.json; `partial` keeps the stage resumable."""
        st = self.state
        self.make_ema()
        row, images, attrs, detected = self.evaluate_now(self.eval_n)
        st["results"]["final"] = dict(row, partial=partial)
        self.save_samples(images, attrs, detected)
        sweep = []
        for g in ([] if partial else self.sweep):
            if g == self.args.guidance:
                sweep.append(row)
                continue
            sweep.append(self.evaluate_now(self.eval_n, guidance=g, record=False)[0])
        st["results"]["sweep"] = sweep
        info = dict(name=tarch.MODEL_NAME, seed=self.args.seed, config=asdict(self.cfg), plan=st["plan"],
                    steps=st["steps"], eval=st["results"].get("final"), eval_seed=EVAL_SEED)
        path = tarch.save_pipeline(self.out / "model", self.vae, self.ema_te, self.ema_unet, info=info)
        size_mb = sum(f.stat().st_size for f in path.rglob("*.safetensors")) / 2**20
        log.info("saved %s (%.1f MB of fp16 weights)", path, size_mb)
        st["results"]["model_mb"] = round(size_mb, 2)
        self.save_ckpt()
        self.write_json()
        if partial:
            log.info("exported the model as it is now (UNet step %d of %s): rerun the same command to continue",
                     st["steps"]["unet"], st["plan"].get("unet"))
            return
        if st["plan"].get("unet_from"):
            log.info("an extended run: the invocations in accuracy.json, in order, reproduce it")
        else:
            log.info("reproduce without a time budget: python3 -m fewstep.worlds.shapes.train_teacher --out OUT "
                     "--seed %d --size %d --batch %d --vae-batch %d --vae-steps %d --text-steps %d --unet-steps %d "
                     "--device %s", self.args.seed, self.args.size, self.batch, self.vae_batch, st["plan"]["vae"],
                     st["steps"]["text"], st["plan"]["unet"], self.device.type)
        log.info("total %.1f s", self.clock.elapsed())

    def save_samples(self, images, attrs, detected, n=32):
        """Pairs (target render, generated image) with what the detectors found wrong, 8 pairs a row."""
        from ...images import grid

        from .world import render

        n = min(n, len(images))
        size = images[0].size[0]
        cells, labels = [], []
        for e, im, lab in zip(attrs[:n], images[:n], mistakes(attrs[:n], detected[:n])):
            cells += [render(e, size), im]
            labels += ["target", lab]
        grid(cells, labels, cols=min(16, len(cells))).save(self.out / "samples.png")

    def write_json(self):
        st = self.state
        doc = dict(model=tarch.MODEL_NAME, stage=st["stage"], steps=st["steps"], plan=st["plan"],
                   seconds={k: round(v, 1) for k, v in st["seconds"].items()}, batch=self.batch,
                   vae_batch=self.vae_batch, results=st["results"], history=st["history"],
                   invocations=st["invocations"], eval=dict(sampler="euler", steps=self.args.eval_steps,
                                                            guidance=self.args.guidance, eval_seed=EVAL_SEED))
        (self.out / "accuracy.json").write_text(json.dumps(doc, indent=1) + "\n")


def setup_logging(out):
    out.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):  # a second run in the same process logs to its own folder only
        log.removeHandler(h)
        h.close()
    for h in (logging.FileHandler(out / "train.log"), logging.StreamHandler(sys.stdout)):
        h.setFormatter(fmt)
        log.addHandler(h)


def main(argv=None):
    # the budget counts from the interpreter's imports when run as a script, from this call when called
    start = T_START if argv is None else time.monotonic()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_logging(Path(args.out))
    log.info("command: python3 -m fewstep.worlds.shapes.train_teacher %s", shlex.join(sys.argv[1:] if argv is None
                                                                                    else argv))
    return Trainer(args, start).run()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FewstepError as e:
        print(f"fewstep: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
