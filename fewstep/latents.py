"""VAE latent scaling, written once: the engine (encode, decode), the trainer and the stream use these."""


def _factors(vae):
    cfg = vae.config
    return cfg.scaling_factor, (cfg.get("shift_factor") if hasattr(cfg, "get") else None) or 0.0


def to_unet(vae, z):
    """VAE latent -> the scaled latent a UNet works in: (z - shift) * scaling."""
    scale, shift = _factors(vae)
    return (z - shift) * scale


def to_vae(vae, x):
    """The UNet's scaled latent -> what the VAE decoder takes: x / scaling + shift."""
    scale, shift = _factors(vae)
    return x / scale + shift
