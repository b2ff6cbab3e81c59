"""Image -> tensor and horizontal flip. Resizing (shorter side / max size) and normalisation
happen inside torchvision's ``GeneralizedRCNNTransform``, i.e. in the model.

Images stay ``uint8`` on the host (DataLoader, pinned memory, host-to-device copy: 4x fewer
bytes than float32) and become float in [0, 1] on the device, in ``to_device`` /
``image_to_device``: every path into the model goes through one of them.

The flip is decided by a per-sample seed from the sampler rather than a global
RNG, so that a resumed run sees exactly the augmentations of an uninterrupted one,
whatever the DataLoader workers did.
"""
from __future__ import annotations

import random

import torch
from torchvision.transforms.functional import pil_to_tensor


class TrainTransform:
    def __init__(self, hflip_prob: float = 0.5):
        self.hflip_prob = hflip_prob

    def __call__(self, image, target, flip_seed=None):
        x = pil_to_tensor(image)  # uint8 CHW
        rng = random.Random(flip_seed)
        if self.hflip_prob > 0 and rng.random() < self.hflip_prob:
            x = x.flip(-1)
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = x.shape[-1] - target["boxes"][:, [2, 0]]
            target = {**target, "boxes": boxes}
        return x, target


class EvalTransform:
    def __call__(self, image, target, flip_seed=None):
        return pil_to_tensor(image), target  # uint8 CHW


def image_to_device(image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A uint8 CHW image on the host -> float32 in [0, 1] on ``device`` (a float image is only moved)."""
    image = image.to(device, non_blocking=True)
    return image.float().div_(255) if image.dtype == torch.uint8 else image


def to_device(images, targets, device: torch.device):
    images = [image_to_device(im, device) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets
