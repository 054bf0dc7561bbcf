"""The fast-path flags shared by `fewstep generate` and `fewstep serve` (no torch import here)."""


def add_arguments(parser):
    """The fast-path flags of `fewstep generate` and `fewstep serve`; speed_kwargs(args) maps them to fewstep.load."""
    g = parser.add_argument_group("speed (defaults are chosen per device)")
    g.add_argument("--vae", default="full", metavar="full|tiny|PATH",
                   help="decoder: the model's VAE (default), tiny (TAESD/TAESDXL from the hub cache) or a local "
                        "AutoencoderTiny folder - several times faster, slightly softer images")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet and the decoder (minutes to compile, faster steps after)")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="replay each UNet step as a CUDA graph (seconds to capture; CUDA only)")
    g.add_argument("--fused-qkv", action="store_true",
                   help="one GEMM for the attention's q/k/v projections (for GPUs; no gain measured on CPUs)")
    g.add_argument("--offload", action="store_true", help="keep weights in CPU memory, each part on the GPU only "
                                                          "while it runs (low-memory GPUs)")
    g.add_argument("--backend", choices=("torch", "openvino"), default="torch",
                   help="what runs the UNet and the VAE: torch (default) or openvino (CPU; pip install "
                        "'fewstep[openvino]'; the first run with a model, LoRA set and size converts it, minutes at "
                        "real size, cached after)")
    g.add_argument("--quantize", choices=("int8",), default=None,
                   help="with --backend openvino: the UNet in int8 (NNCF hybrid quantization, calibrated on a few "
                        "runs of the request's own settings the first time, cached after) and the VAE's weights in "
                        "int8; slightly different images")
    g.add_argument("--deep-cache", type=int, default=1, metavar="N",
                   help="every N-th UNet call of a run full, the others reuse its deep features and recompute the "
                        "outermost level (DeepCache; 1: off). For many-step samplers: it costs LCM's 4-step images "
                        "accuracy")
    g.add_argument("--tome", type=float, default=0.0, metavar="RATIO",
                   help="token merging: this share of the full-resolution level's tokens (0 to 0.75) merged before "
                        "each self-attention (ToMe; 0: off); SD1.5 512 on a CPU: 1.1x a UNet step at 0.5")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=None,
                   help="keep the UNet in NCHW memory format")
    return g


def speed_kwargs(args, server=False):
    """fewstep.load keyword arguments from the flags of add_arguments; a server converts for OpenVINO in the
    background (requests run on torch until a new weight state is converted, never waiting for it)."""
    kw = dict(vae=args.vae, compile=args.compile, cuda_graphs=args.cuda_graphs, offload=args.offload,
              fused_qkv=args.fused_qkv)
    if getattr(args, "deep_cache", 1) != 1:
        kw["deep_cache"] = args.deep_cache
    if getattr(args, "tome", 0.0):
        kw["tome"] = args.tome
    if getattr(args, "backend", "torch") != "torch":
        kw["backend"] = args.backend
        kw["openvino_background"] = server
    if getattr(args, "quantize", None):
        kw["quantize"] = args.quantize
    if args.channels_last is not None:
        kw["channels_last"] = args.channels_last
    return kw
