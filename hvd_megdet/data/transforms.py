"""Image -> tensor and horizontal flip. Resizing (shorter side / max size) and normalisation
happen inside torchvision's ``GeneralizedRCNNTransform``, i.e. in the model.

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
        x = pil_to_tensor(image).float().div_(255)
        rng = random.Random(flip_seed)
        if self.hflip_prob > 0 and rng.random() < self.hflip_prob:
            x = x.flip(-1)
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = x.shape[-1] - target["boxes"][:, [2, 0]]
            target = {**target, "boxes": boxes}
        return x, target


class EvalTransform:
    def __call__(self, image, target, flip_seed=None):
        return pil_to_tensor(image).float().div_(255), target


def to_device(images, targets, device: torch.device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets
