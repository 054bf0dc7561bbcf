"""A ControlNet for the embedded default model (the shapes teacher), built in a test: diffusers'
ControlNetModel.from_unet on its UNet, with seeded random output convolutions so that it changes the image."""

import functools

import torch


@functools.cache
def shapes_controlnet(folder):
    """Save the ControlNet to `folder` (once per session) and return the folder as a string."""
    from diffusers import ControlNetModel

    from tests.support.serve import default_engine

    torch.manual_seed(0)
    # the shapes VAE's latent factor is 4: two downsampling steps in the conditioning embedding, not three
    net = ControlNetModel.from_unet(default_engine().c.unet, conditioning_embedding_out_channels=(16, 32, 64))
    with torch.no_grad():  # zero-initialized as in training; random here, so the control shows in the image
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            conv.weight.normal_(0, 0.05)
    net.save_pretrained(folder)
    return str(folder)


def edge_image(size=64):
    """A white square on black: a control image (and a canny input) with clear edges."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (0, 0, 0))
    ImageDraw.Draw(image).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(255, 255, 255))
    return image
