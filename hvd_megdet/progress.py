"""Rank 0's view of training progress: a tqdm bar on a terminal (else periodic log lines with
it/s, ETA, lr and losses), ``metrics.jsonl`` and TensorBoard scalars. Other ranks hold none."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


def tensorboard(out: Path):
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(str(Path(out) / "tensorboard"))


class Progress:
    def __init__(self, out: Path, start: int, total: int, log_period: int, log, writer=None):
        self.start, self.total, self.log_period, self.log, self.writer = start, total, log_period, log, writer
        self.metrics = open(Path(out) / "metrics.jsonl", "a")
        self.t0 = time.time()
        self._done = 0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True)

    def rate(self) -> float:
        return self._done / max(time.time() - self.t0, 1e-9) if self._done else 0.0

    def update(self, it: int, images: int, lr: float, means: dict, last: bool) -> None:
        """After iteration ``it``: the bar every time; a record every ``log_period`` and at the end."""
        self._done = it - self.start
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{means['loss']:.3f}", lr=f"{lr:.4g}", refresh=False)
        if it % self.log_period and not last:
            return
        record = {"iteration": it, "images": images, "lr": lr, **means, "it_per_s": self.rate(), "time": time.time()}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        rate = self.rate()
        eta = (self.total - it) / rate if rate else float("nan")
        parts = " ".join(f"{k.replace('loss_', '')} {v:.3f}" for k, v in sorted(means.items()) if k != "loss")
        self.log.info("iter %d/%d (%.0f%%) %.2f it/s ETA %s lr %.5g loss %.4f (%s)", it, self.total,
                      100 * it / self.total, rate, _fmt_eta(eta), lr, means["loss"], parts)
        if self.writer:
            for k, v in {"lr": lr, **means}.items():
                self.writer.add_scalar(f"train/{k}", v, images)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        self.metrics.close()


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
