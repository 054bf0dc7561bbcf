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
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=None,
                   help="keep the UNet in NCHW memory format")
    return g


def speed_kwargs(args, server=False):
    """fewstep.load keyword arguments from the flags of add_arguments; a server converts for OpenVINO in the
    background (requests run on torch until a new weight state is converted, never waiting for it)."""
    kw = dict(vae=args.vae, compile=args.compile, cuda_graphs=args.cuda_graphs, offload=args.offload,
              fused_qkv=args.fused_qkv)
    if getattr(args, "backend", "torch") != "torch":
        kw["backend"] = args.backend
        kw["openvino_background"] = server
    if args.channels_last is not None:
        kw["channels_last"] = args.channels_last
    return kw
