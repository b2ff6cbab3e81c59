"""Images cross to the device as uint8 and become float [0, 1] there: the same values as the
former host-side float conversion (the model is unchanged)."""
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from hvd_megdet.data import shapes
from hvd_megdet.data.coco import CocoDetection, collate
from hvd_megdet.data.transforms import EvalTransform, TrainTransform, image_to_device, to_device

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def old_float(path, flip: bool) -> torch.Tensor:
    """What the transforms returned before: float32 / 255 on the host."""
    x = pil_to_tensor(Image.open(path).convert("RGB")).float().div_(255)
    return x.flip(-1) if flip else x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [False, True])
def test_host_batch_is_uint8_device_batch_is_the_old_float(tmp_path, device, train):
    root = shapes.ensure(tmp_path / "s", 6, 3, 64, seed=3)
    split = "train" if train else "val"
    ds = CocoDetection(root / split, root / f"annotations/instances_{split}.json", train=train,
                       transform=TrainTransform(1.0) if train else EvalTransform())
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate)
    images, targets = next(iter(loader))
    assert all(im.dtype == torch.uint8 and im.shape == (3, 64, 64) for im in images)   # on the host
    dev_images, dev_targets = to_device(images, targets, torch.device(device))
    for im, t, dt in zip(dev_images, targets, dev_targets):
        assert im.dtype == torch.float32 and im.device.type == device
        want = old_float(ds.image_dir / ds.coco.imgs[t["image_id"]]["file_name"], flip=train)
        if device == "cpu":
            assert torch.equal(im, want)
        else:  # CUDA divides by a scalar as a multiply by its reciprocal: within one ulp
            torch.testing.assert_close(im.cpu(), want, rtol=1.2e-7, atol=0)
        assert torch.equal(dt["boxes"].cpu(), t["boxes"]) and dt["image_id"] == t["image_id"]
    # a float image (already converted) is moved, not divided again
    f = images[0].float() / 255
    assert torch.equal(image_to_device(f, torch.device(device)).cpu(), f)
