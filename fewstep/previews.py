"""Cheap decoders for progress previews: a server's preview must not cost a full VAE decode on the CPU.

`preview_decoder(engine)` picks, once per engine: the fast path's own tiny decoder; else the family's
AutoencoderTiny where one is on this machine (the shapes world's, the hub cache's TAESD/TAESDXL: fewstep.stream's
"auto" search, never the network); else a linear latent-to-RGB map fitted from the engine's own VAE encoder (a
least-squares fit of flat colours, one small encoder call). The full decoder is never used for a preview.
"""

import threading
import weakref

import torch

from . import latents

_CHOSEN = weakref.WeakKeyDictionary()  # engine -> its preview decoder
_LOCK = threading.Lock()


class LatentRGB:
    """rgb = W z + b per latent pixel (then upsampled by the VAE factor): A1111's "approximate cheap" preview,
    but with the map fitted to the model's own VAE rather than constants per family."""

    def __init__(self, weight, bias, factor):
        self.weight, self.bias, self.factor = weight.float(), bias.float(), factor  # (3, C), (3,)

    @classmethod
    def fit(cls, vae, factor, *, colors=32, seed=0):
        """Encode flat random-colour tiles (4x4 latent pixels each) and fit the map on their inner latent pixels:
        the UNet's scaled latents -> RGB in [-1, 1]."""
        g = torch.Generator().manual_seed(seed)
        side = 4  # tiles per row and column
        rgb = torch.rand(colors, 3, generator=g) * 2 - 1
        tile = 4 * factor
        images = rgb.view(-1, side * side, 3, 1, 1).expand(-1, -1, 3, tile, tile)  # (batches, tiles, 3, t, t)
        images = images.reshape(-1, side, side, 3, tile, tile).permute(0, 3, 1, 4, 2, 5)
        images = images.reshape(-1, 3, side * tile, side * tile)
        with torch.no_grad():
            z = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean.float().cpu()
        z = latents.to_unet(vae, z)  # (batches, C, 16, 16)
        c = z.shape[1]
        inner = z.view(-1, c, side, 4, side, 4)[:, :, :, 1:3, :, 1:3].mean((3, 5))  # away from the tiles' edges
        zs = inner.permute(0, 2, 3, 1).reshape(-1, c)  # (colors, C), in the order of rgb
        a = torch.cat([zs, torch.ones(len(zs), 1)], 1)
        sol = torch.linalg.lstsq(a, rgb).solution  # (C + 1, 3)
        return cls(sol[:c].T, sol[c], factor)

    @classmethod
    def for_channels(cls, channels, factor=8):
        """A fixed map for benchmarks (no VAE): the first three channels as RGB."""
        return cls(torch.eye(3, channels), torch.zeros(3), factor)

    def __call__(self, z):
        """(n, C, h, w) latents -> (n, 3, h * factor, w * factor) in [-1, 1]."""
        w = self.weight.to(z.device)
        out = torch.einsum("oc,nchw->nohw", w, z.float()) + self.bias.to(z.device).view(1, 3, 1, 1)
        return torch.nn.functional.interpolate(out, scale_factor=self.factor, mode="bilinear").clamp(-1, 1)


def preview_decoder(engine):
    """The engine's preview decoder: an AutoencoderTiny or a LatentRGB (chosen once, kept while the engine lives)."""
    with _LOCK:
        hit = _CHOSEN.get(engine)
        if hit is None:
            hit = _CHOSEN[engine] = _choose(engine)
        return hit


def _choose(engine):
    from .stream import SHAPES_TINY_VAE, _cached, _is_tiny

    if _is_tiny(engine.decoder):
        return engine.decoder
    from .speed import TINY_DECODERS, load_tiny_decoder

    if engine.arch == "shapes":
        src = SHAPES_TINY_VAE if (SHAPES_TINY_VAE / "config.json").exists() else None
    else:
        src = _cached(TINY_DECODERS[engine.c.preset.xl])
    if src is not None:
        try:
            tiny = load_tiny_decoder(str(src), engine.c.preset.xl, engine.device, engine.dtype)
        except Exception:  # noqa: BLE001 - an unusable cached decoder only means the linear preview
            tiny = None
        if tiny is not None and _fits(tiny, engine):
            return tiny
    vae = engine.c.vae
    return LatentRGB.fit(vae, engine.vae_factor)


def _fits(tiny, engine):
    cfg = tiny.config
    factor = 2 ** (len(cfg.encoder_block_out_channels) - 1)
    return factor == engine.vae_factor and cfg.latent_channels == engine.c.unet.config.out_channels


def preview_images(engine, x0):
    """PIL images of latents x0 through the engine's preview decoder (never its full VAE decoder)."""
    dec = preview_decoder(engine)
    if isinstance(dec, LatentRGB):
        return engine.pixels_to_images(dec(x0), engine.dtype)
    return engine.decode(x0, decoder=dec)
