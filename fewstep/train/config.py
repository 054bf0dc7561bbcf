"""Training settings: one frozen dataclass for every method, read from flags and/or a JSON/TOML file, recorded
into the output folder so that a run can be reproduced. No torch here (the CLI imports this module)."""

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..errors import FewstepError

METHODS = ("lcm-lora", "lcm", "lora", "controlnet")

# The LCM-LoRA recipe's targets (diffusers examples/consistency_distillation): attention, projections,
# feed-forward, resnet convs, up/down samplers and the time-embedding projection.
TARGETS = {
    "lcm": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
            "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"),
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "transformer": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
}

# Settings that change the training trajectory: a resumed run must use the same values to continue exactly.
TRAJECTORY = ("method", "model", "data", "batch_size", "grad_accum", "resolution", "crop", "flip", "lr",
              "lr_warmup", "lr_schedule", "weight_decay", "max_grad_norm", "rank", "lora_alpha", "targets", "seed",
              "mixed_precision", "w_min", "w_max", "loss", "huber_c", "ddim_steps", "timestep_scaling", "ema_decay",
              "time_cond_proj_dim", "caption_dropout", "snr_gamma", "vae")


class TrainError(FewstepError):
    """A training setting, data set or checkpoint that cannot be used as given."""


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; None means "the method's / the model's default" (see resolved())."""

    method: str  # lcm-lora | lcm | lora | controlnet
    model: str  # the teacher (lcm-lora, lcm) or the base model (lora, controlnet): folder, .safetensors or hub id
    data: str  # image folder, tar shard pattern or NAME:ARG of a programmatic source
    out: str
    max_steps: int = 1000
    batch_size: int = 16  # per process and micro-step; the global batch is batch_size * processes * grad_accum
    grad_accum: int = 1
    resolution: int | None = None  # square side in pixels; default the model's native size
    crop: str = "center"  # center | random
    flip: bool = False  # random horizontal flips (off: captions often say left/right)
    lr: float | None = None  # 1e-4 for LoRAs, 1e-6 for full LCMs, 1e-5 for ControlNets (the diffusers READMEs)
    lr_warmup: int = 0
    lr_schedule: str = "constant"  # constant | cosine
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    rank: int | None = None  # 64 for lcm-lora, 16 for lora
    lora_alpha: float | None = None  # default: the rank (scale 1)
    targets: str | None = None  # a TARGETS preset name or comma-separated module name suffixes
    seed: int = 0
    resume: str | None = None  # "latest" or a checkpoint folder
    mixed_precision: str | None = None  # no | fp16 | bf16; None: accelerate's config (launch flag), else no
    device: str = "auto"  # auto | cpu | cuda (under `accelerate launch` the launcher places each process)
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validate_every: int = 500  # steps between validation grids, and one at the end; 0: none
    validation_prompts: tuple = ()  # default: the first two captions of the data
    validation_steps: tuple | None = None  # (1, 2, 4, 8) LCM sampler for distillation; (25,) Euler for lora, controlnet
    validation_guidance: float | None = None  # 1.0 lcm-lora, 8.5 lcm (embedded), 7.5 lora and controlnet
    gradient_checkpointing: bool = False
    num_workers: int = 4  # threads decoding images ahead of the step
    save_dtype: str | None = None  # fp16 | bf16 | fp32; default fp16 for LoRA files, fp32 for model folders
    vae: str | None = None  # another VAE (e.g. madebyollin/sdxl-vae-fp16-fix for fp16 SDXL)
    allow_pickle: bool = False
    quiet: bool = False
    # distillation (lcm-lora, lcm)
    w_min: float | None = None  # 5 for SD 1.x/2.x, 3 for SDXL (LCM-form guidance, Imagen scale w + 1)
    w_max: float = 15.0
    loss: str = "huber"  # huber | l2
    huber_c: float = 0.001
    ddim_steps: int = 50  # points of the DDIM solver grid (skip k = 1000 // 50 = 20)
    timestep_scaling: float | None = None  # default: the teacher's scheduler config (10)
    ema_decay: float = 0.95  # lcm: the target network's EMA
    time_cond_proj_dim: int = 256  # lcm: width of the guidance embedding added to the student
    # lora fine-tuning and controlnet
    caption_dropout: float = 0.0
    snr_gamma: float | None = None  # min-SNR loss weighting (Hang et al. 2023), off by default
    extra: dict = field(default_factory=dict)  # recorded, not interpreted (notes from the caller)

    def __post_init__(self):
        check(self)

    def resolved(self, *, xl=False, native_size=512):
        """The config with method and model defaults filled in."""
        m = self.method
        lora = m in ("lcm-lora", "lora")
        rank = self.rank or (64 if m == "lcm-lora" else 16)
        standard = m in ("lora", "controlnet")  # trained with the noise-prediction loss, validated with Euler
        return replace(
            self,
            resolution=self.resolution or native_size,
            lr=self.lr if self.lr is not None else (1e-4 if lora else 1e-5 if m == "controlnet" else 1e-6),
            rank=rank,
            lora_alpha=self.lora_alpha if self.lora_alpha is not None else float(rank),
            targets=self.targets or ("lcm" if m == "lcm-lora" else "transformer"),
            w_min=self.w_min if self.w_min is not None else (3.0 if xl else 5.0),
            save_dtype=self.save_dtype or ("fp32" if m in ("lcm", "controlnet") else "fp16"),
            validation_steps=tuple(self.validation_steps or ((25,) if standard else (1, 2, 4, 8))),
            validation_guidance=(self.validation_guidance if self.validation_guidance is not None
                                 else {"lcm-lora": 1.0, "lcm": 8.5, "lora": 7.5, "controlnet": 7.5}[m]),
        )

    def target_modules(self):
        t = self.targets or ""
        if t in TARGETS:
            return list(TARGETS[t])
        return [s.strip() for s in t.split(",") if s.strip()]

    def record(self):
        """A JSON-ready dict of the settings."""
        d = asdict(self)
        for k in ("validation_prompts", "validation_steps"):
            d[k] = list(d[k]) if d[k] is not None else None
        return d


def check(c):
    """Refuse impossible settings with one line that says what to do."""
    def bad(msg):
        raise TrainError(msg)

    if c.method not in METHODS:
        bad(f"unknown training method {c.method!r} (use {', '.join(METHODS)})")
    for name in ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "ddim_steps"):
        if getattr(c, name) < 1:
            bad(f"--{name.replace('_', '-')} must be at least 1, got {getattr(c, name)}")
    if c.validate_every < 0 or c.num_workers < 0 or c.lr_warmup < 0:
        bad("--validate-every, --num-workers and --lr-warmup must be >= 0")
    if c.resolution is not None and (c.resolution < 8 or c.resolution % 8):
        bad(f"--resolution must be a multiple of 8, got {c.resolution}")
    if c.device not in ("auto", "cpu", "cuda", "mps"):
        bad(f"--device must be auto, cpu, cuda or mps, got {c.device!r} (pick GPUs with CUDA_VISIBLE_DEVICES; "
            "accelerate launch gives each process its own)")
    if c.crop not in ("center", "random"):
        bad(f"--crop must be center or random, got {c.crop!r}")
    if c.lr_schedule not in ("constant", "cosine"):
        bad(f"--lr-schedule must be constant or cosine, got {c.lr_schedule!r}")
    if c.lr is not None and not c.lr > 0:
        bad(f"--lr must be positive, got {c.lr}")
    if c.rank is not None and c.rank < 1:
        bad(f"--rank must be at least 1, got {c.rank}")
    if c.mixed_precision not in (None, "no", "fp16", "bf16"):
        bad(f"--mixed-precision must be no, fp16 or bf16, got {c.mixed_precision!r}")
    if c.save_dtype not in (None, "fp16", "bf16", "fp32"):
        bad(f"--save-dtype must be fp16, bf16 or fp32, got {c.save_dtype!r}")
    if c.loss not in ("huber", "l2"):
        bad(f"--loss must be huber or l2, got {c.loss!r}")
    if c.w_min is not None and not 0 <= c.w_min <= c.w_max:
        bad(f"guidance range [{c.w_min}, {c.w_max}] is empty: need 0 <= --w-min <= --w-max")
    if not 0 <= c.ema_decay < 1:
        bad(f"--ema-decay must be in [0, 1), got {c.ema_decay}")
    if not 0 <= c.caption_dropout <= 1:
        bad(f"--caption-dropout must be in [0, 1], got {c.caption_dropout}")
    if c.validation_steps is not None and any(int(s) < 1 for s in c.validation_steps):
        bad("--validation-steps takes positive step counts like 1,2,4,8")
    if c.targets is not None and c.targets not in TARGETS and not c.target_modules():
        bad(f"--targets: give a preset ({', '.join(TARGETS)}) or comma-separated module names")


FIELDS = {f.name for f in fields(TrainConfig)}
ALIASES = {"teacher": "model", "base": "model", "validation_prompt": "validation_prompts"}  # the flags' names


def read_config_file(path):
    """Settings from a JSON or TOML file; keys are flag or field names (dashes allowed). A recorded train_config.json
    (settings under "config") works too, so a run can be repeated from its record."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise TrainError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ImportError:
        raise TrainError("TOML config files need Python 3.11+: use JSON") from None
    except ValueError as e:
        raise TrainError(f"config file {path} is not valid {p.suffix.lstrip('.') or 'JSON'}: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]
    if not isinstance(data, dict):
        raise TrainError(f"config file {path} must hold a table/object of settings")
    out = {}
    for k, v in data.items():
        key = ALIASES.get(k.replace("-", "_"), k.replace("-", "_"))
        if key not in FIELDS:
            raise TrainError(f"config file {path}: unknown setting {k!r}")
        out[key] = v
    for k in ("validation_prompts", "validation_steps"):
        if isinstance(out.get(k), list):
            out[k] = tuple(out[k])
    return out


def diff_trajectory(saved, current):
    """The trajectory settings that differ between a checkpoint's record and this run."""
    keys = TRAJECTORY + (("max_steps",) if current.get("lr_schedule") == "cosine" else ())  # cosine spans the run
    return [k for k in keys if k in saved and saved[k] != current.get(k)]
