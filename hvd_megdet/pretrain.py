"""The miniature's "ImageNet": classification pretraining of the detector's TinyResNet body.

MegDet fine-tunes an ImageNet-pretrained ResNet-50; its "without BN" cells use the pretrained,
frozen BN statistics. This module gives the embedded demo the same start: the same
``TinyResNet`` the detector builds (``model.tiny_widths``) with the project's SyncBatchNorm,
trained with Horovod on an image classification task generated on the fly, and saved as a
state dict that ``model.backbone_weights=PATH`` loads (``fc.*`` is dropped there; BN running
statistics are kept, for frozen-BN detectors).

The task ("which shape dominates the picture") is DISTINCT from the detection set: eight shape
classes none of which is a detection class (ring, cross, star, hexagon, crescent, chevron, L,
bow tie), at random rotation, aspect and scale, filled flat, striped or checkered, on random
gradient / blocky / smooth / striped / noisy backgrounds, with 0-3 small clutter shapes of any
class drawn over the large one; the label is the large shape's class, no box is ever given. What
it teaches is what ImageNet teaches a COCO detector: generic edge, corner, curvature, colour and
texture filters, figure/ground separation on clutter and some scale and rotation invariance,
not the detection labels (rectangle, ellipse, triangle) nor where objects are.

Deterministic for a seed on a given world size: each rank draws its batches from its own
generator (seed, rank), the model starts from rank 0's init, SyncBN and gradient averaging are
exact sums of the ranks' values, and one thread per rank. Cached like the shapes set: a folder
keyed by the recipe and world size under ``$HVD_MEGDET_CACHE``, written atomically by rank 0.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hvd_megdet import dist, optim, rng
from hvd_megdet.config import SolverConfig
from hvd_megdet.model import TinyResNet
from hvd_megdet.sync_bn import SyncBatchNorm, average_running_stats

VERSION = 1  # bump when the generator, the model or the training changes: part of the cache key
CLASSES = ("ring", "cross", "star", "hexagon", "crescent", "chevron", "L", "bowtie")
# torchvision's GeneralizedRCNNTransform normalises detector inputs with these (ImageNet's):
# the pretraining sees its images exactly as the detector will.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
WEIGHTS_FILE, INFO_FILE = "weights.pth", "weights.json"


@dataclass(frozen=True)
class Recipe:
    widths: tuple[int, ...] = (16, 32, 64, 128)  # shapes_tiny's model.tiny_widths
    image_size: int = 64          # below the detector's 128 px, as ImageNet's 224 is below COCO's 800
    iterations: int = 1500
    batch_per_rank: int = 32
    lr: float = 0.2               # peak, for the whole global batch (SGD, momentum 0.9)
    warmup_fraction: float = 0.05  # linear warmup, then cosine to 0
    weight_decay: float = 1e-4    # not on BN parameters
    heldout: int = 2048           # held-out images (their own generator stream)
    seed: int = 0

    def key(self, world_size: int) -> str:
        """Cache folder name: the main parameters readable, all of them in the hash."""
        full = json.dumps({"version": VERSION, "world_size": world_size, **dataclasses.asdict(self)}, sort_keys=True)
        h = hashlib.sha256(full.encode()).hexdigest()[:10]
        w = "-".join(map(str, self.widths))
        return (f"tinyresnet-v{VERSION}-w{w}-{self.image_size}px-{self.iterations}it-"
                f"{world_size}x{self.batch_per_rank}-seed{self.seed}-{h}")


DEFAULT = Recipe()
# --quick: seconds, for the tests (same widths: it must load into the quick detector cells)
QUICK = Recipe(image_size=32, iterations=40, batch_per_rank=16, lr=0.1, heldout=256)


def cache_root() -> Path:
    return Path(os.environ.get("HVD_MEGDET_CACHE", Path.home() / ".cache" / "hvd_megdet"))


def weights_dir(recipe: Recipe, world_size: int) -> Path:
    return cache_root() / recipe.key(world_size)


def read_info(folder: Path) -> dict | None:
    """The finished pretraining's report (weights.json), None if it is not there (yet)."""
    f = Path(folder) / INFO_FILE
    return json.loads(f.read_text()) if f.is_file() and (Path(folder) / WEIGHTS_FILE).is_file() else None


def state_digest(state: dict) -> str:
    """sha256 of a state dict's names, dtypes, shapes and values (independent of the file format)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


# --- the data: drawn on the fly, vectorised in torch ---------------------------------------

def _uniform(g: torch.Generator, lo, hi, *shape) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=g)


def _shape_mask(k: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside-mask of shape class ``k`` in local coordinates (unit radius)."""
    au, av = u.abs(), v.abs()
    if k == 0:                                                              # ring
        rho = torch.sqrt(u * u + v * v)
        return (rho < 1) & (rho > 0.55)
    if k == 1:                                                              # cross
        return ((au < 0.3) & (av < 0.95)) | ((av < 0.3) & (au < 0.95))
    if k == 2:                                                              # five-pointed star
        return torch.sqrt(u * u + v * v) < 0.4 + 0.6 * ((torch.cos(5 * torch.atan2(v, u)) + 1) / 2) ** 2
    if k == 3:                                                              # hexagon
        return torch.maximum(av, (av + math.sqrt(3) * au) / 2) < 0.9
    if k == 4:                                                              # crescent
        return (u * u + v * v < 1) & ((u - 0.5) ** 2 + v * v > 0.5625)
    if k == 5:                                                              # chevron
        return (av < 0.9) & ((u - 0.9 * av + 0.35).abs() < 0.28)
    if k == 6:                                                              # L
        return ((u > -0.9) & (u < -0.3) & (av < 0.9)) | ((v > 0.3) & (v < 0.9) & (au < 0.9))
    return (av < au) & (au < 0.95) & (av < 0.95)                            # bow tie


def _shape_masks(cls: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside-masks (N, O, S, S) of the shapes ``cls`` (N, O), each computed only where drawn."""
    flat_cls, fu, fv = cls.flatten(), u.flatten(0, 1), v.flatten(0, 1)
    out = torch.zeros(fu.shape, dtype=torch.bool)
    for k in range(len(CLASSES)):
        idx = (flat_cls == k).nonzero().squeeze(1)
        if idx.numel():
            out[idx] = _shape_mask(k, fu[idx], fv[idx])
    return out.view(u.shape)


def make_batch(g: torch.Generator, n: int, size: int, clutter: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (float, normalised as the detector's inputs, N x 3 x size x size) and labels."""
    s = size
    yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    # background: colour gradient + blocky + smooth low-frequency texture + stripes + pixel noise
    c0, c1 = _uniform(g, 0.1, 0.85, n, 3, 1, 1), _uniform(g, 0.1, 0.85, n, 3, 1, 1)
    a = _uniform(g, 0, 2 * math.pi, n, 1, 1, 1)
    t = (xx * torch.cos(a) + yy * torch.sin(a)) / s
    t = (t - t.amin((2, 3), keepdim=True)) / (t.amax((2, 3), keepdim=True) - t.amin((2, 3), keepdim=True) + 1e-6)
    img = c0 + (c1 - c0) * t
    img = img + _uniform(g, 0, 0.12, n, 1, 1, 1) * F.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=(s, s))
    img = img + _uniform(g, 0, 0.15, n, 1, 1, 1) * F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=(s, s),
                                                                 mode="bilinear", align_corners=False)
    b, f = _uniform(g, 0, math.pi, n, 1, 1, 1), _uniform(g, 2, 10, n, 1, 1, 1)
    stripes = torch.sin(2 * math.pi * f * (xx * torch.cos(b) + yy * torch.sin(b)) / s)
    img = img + (torch.rand(n, 1, 1, 1, generator=g) < 0.3) * _uniform(g, 0, 0.1, n, 1, 1, 1) * stripes
    # objects: one large (the label) drawn first, then `clutter` small ones, each present with p 0.6
    o = 1 + clutter
    cls = torch.randint(len(CLASSES), (n, o), generator=g)
    radius = torch.cat([_uniform(g, 0.22, 0.42, n, 1), _uniform(g, 0.06, 0.14, n, clutter)], 1) * s
    cx = torch.cat([_uniform(g, 0.3, 0.7, n, 1), _uniform(g, 0, 1, n, clutter)], 1) * s
    cy = torch.cat([_uniform(g, 0.3, 0.7, n, 1), _uniform(g, 0, 1, n, clutter)], 1) * s
    theta = _uniform(g, 0, 2 * math.pi, n, o)
    aspect = torch.exp(_uniform(g, math.log(0.7), math.log(1.4), n, o)).sqrt()
    present = torch.cat([torch.ones(n, 1, dtype=torch.bool), torch.rand(n, clutter, generator=g) < 0.6], 1)
    dx, dy = xx - cx[..., None, None], yy - cy[..., None, None]
    ct, st = torch.cos(theta)[..., None, None], torch.sin(theta)[..., None, None]
    r, asp = radius[..., None, None], aspect[..., None, None]
    u = (dx * ct + dy * st) / (r * asp)
    v = (-dx * st + dy * ct) * asp / r
    inside = _shape_masks(cls, u, v) & present[..., None, None]                 # (N, O, S, S)
    # fill: flat, stripes or checker of two colours, in the shape's own frame
    col1, col2 = torch.rand(n, o, 3, 1, 1, generator=g), torch.rand(n, o, 3, 1, 1, generator=g)
    fill = torch.randint(3, (n, o, 1, 1), generator=g)
    k = _uniform(g, 1.5, 4, n, o, 1, 1) * math.pi
    pattern = torch.where(fill == 1, torch.sin(k * u) > 0,
                          torch.where(fill == 2, torch.sin(k * u) * torch.sin(k * v) > 0, torch.ones_like(inside)))
    paint = torch.where(pattern[:, :, None], col1, col2)                        # (N, O, 3, S, S)
    for j in range(o):  # painter's order: the large shape first, clutter over it
        img = torch.where(inside[:, j, None], paint[:, j], img)
    img = img + _uniform(g, 0, 0.04, n, 1, 1, 1) * torch.randn(n, 3, s, s, generator=g)
    img = img.clamp(0, 1)
    mean, std = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (img - mean) / std, cls[:, 0]


# --- the model -------------------------------------------------------------------------------

class Classifier(TinyResNet):
    """The detector's TinyResNet body + global average pool + ``fc``: its state dict keys are the
    body's (what model.backbone_weights loads) plus ``fc.*`` (dropped there)."""

    def __init__(self, widths, norm, classes: int = len(CLASSES)):
        super().__init__(list(widths), norm)
        self.fc = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def lr_at(recipe: Recipe, it: int) -> float:
    warm = max(1, round(recipe.warmup_fraction * recipe.iterations))
    if it < warm:
        return recipe.lr * (it + 1) / warm
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * (it - warm) / max(1, recipe.iterations - warm)))


@torch.no_grad()
def heldout_accuracy(model: nn.Module, recipe: Recipe, chunk: int = 256) -> float:
    """Accuracy on the held-out images: the same images whatever the world size (chunk i comes
    from generator (seed, i)); the ranks share the chunks and sum their counts. Collective."""
    model.eval()
    correct = total = 0
    chunks = math.ceil(recipe.heldout / chunk)
    for i in range(dist.rank(), chunks, dist.size()):
        g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + 999_983 + i)
        n = min(chunk, recipe.heldout - i * chunk)
        x, y = make_batch(g, n, recipe.image_size)
        correct += int((model(x).argmax(1) == y).sum())
        total += n
    model.train()
    both = dist.allreduce(torch.tensor([correct, total], dtype=torch.float64), op=dist.Sum, name="pretrain_heldout")
    return float(both[0] / both[1])


def train(recipe: Recipe, log) -> tuple[dict, dict]:
    """Train on every rank (collective); returns (state dict, report). SyncBN over all ranks,
    gradients averaged by hvd.DistributedOptimizer (hvd_megdet.optim)."""
    t0 = time.time()
    torch.set_num_threads(1)  # determinism and no oversubscription: one thread per rank
    rng.seed_all(recipe.seed)
    model = Classifier(recipe.widths, SyncBatchNorm)
    solver = SolverConfig(momentum=0.9, weight_decay=recipe.weight_decay, weight_decay_norm=0.0)
    opt = optim.build_optimizer(model, solver, lr_at(recipe, 0))
    dist.broadcast_parameters(model.state_dict())
    g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + dist.rank())
    model.train()
    running = []
    for it in range(recipe.iterations):
        optim.set_lr(opt, lr_at(recipe, it))
        x, y = make_batch(g, recipe.batch_per_rank, recipe.image_size)
        opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        running.append(((logits.argmax(1) == y).float().mean().item(), loss.item()))
        if (it + 1) % max(1, recipe.iterations // 10) == 0 or it + 1 == recipe.iterations:
            acc, lo = map(lambda v: sum(v) / len(v), zip(*running))
            m = dist.average_scalars({"acc": acc, "loss": lo}, name=f"pretrain_log_{it}")
            log.info("pretrain iter %d/%d lr %.4f loss %.3f train acc %.3f (%.0f s)", it + 1, recipe.iterations,
                     lr_at(recipe, it), m["loss"], m["acc"], time.time() - t0)
            last_train_acc, running = m["acc"], []
            if not math.isfinite(m["loss"]):
                raise FloatingPointError(f"pretraining loss is not finite at iteration {it + 1}")
    average_running_stats(model, name="pretrain_bn_stats")  # identical already (one BN group): made sure
    acc = heldout_accuracy(model, recipe)
    wall = time.time() - t0
    report = {"heldout_accuracy": acc, "chance": 1 / len(CLASSES), "final_train_accuracy": last_train_acc,
              "heldout_images": recipe.heldout, "train_images": recipe.iterations * recipe.batch_per_rank * dist.size(),
              "wall_s": round(wall, 1), "world_size": dist.size(), "classes": list(CLASSES),
              "recipe": dataclasses.asdict(recipe), "version": VERSION, "torch": torch.__version__}
    log.info("pretraining done: held-out accuracy %.3f (chance %.3f) in %.0f s", acc, 1 / len(CLASSES), wall)
    return model.state_dict(), report


def save(folder: Path, state: dict, report: dict) -> dict:
    """Write weights.pth + weights.json into ``folder`` atomically (a temp folder renamed; a lost
    race keeps the winner's, identical, files). Call on one rank. Returns the report written."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        state = {k: v.detach().cpu().clone() for k, v in state.items()}
        report = {**report, "digest": state_digest(state), "path": str(folder / WEIGHTS_FILE)}
        torch.save(state, tmp / WEIGHTS_FILE)
        (tmp / INFO_FILE).write_text(json.dumps(report, indent=1) + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:
            if read_info(folder) is None:
                raise  # not a lost race: a real error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
