"""The teachers by preset name: a preset's config dict (what a checkpoint stores) and the model
rebuilt from it. The presets themselves sit beside their models, in dit.PRESETS and unet.PRESETS."""
import dataclasses

import dit
import unet

PRESET_NAMES = sorted(dit.PRESETS) + sorted(unet.PRESETS)


def model_config(preset, num_classes, image_size=None):
    """The config dict of a preset, with the data set's class count and (optionally) image size."""
    if preset in dit.PRESETS:
        cfg = dit.DiTConfig(**dit.PRESETS[preset])
    elif preset in unet.PRESETS:
        cfg = unet.UNetConfig(**unet.PRESETS[preset])
    else:
        raise ValueError(f"--model {preset!r} is not one of {', '.join(PRESET_NAMES)}")
    cfg.num_classes = num_classes
    if image_size is not None:
        cfg.image_size = image_size
    return dataclasses.asdict(cfg)


def build_model(config):
    """Rebuild a DiT or UNet from the config dict a checkpoint stores."""
    if config["arch"] == "dit":
        return dit.DiT(dit.DiTConfig(**config))
    cfg = dict(config, mult=tuple(config["mult"]), attn_res=tuple(config["attn_res"]))
    return unet.UNet(unet.UNetConfig(**cfg))
