"""DataLoader workers of a rank with peers start from a forkserver (not a fork of the rank, whose
MPI/NCCL state is not fork-safe on every InfiniBand stack), ignore the stop signals, and end when
their trainer dies without shutting them down (a crash), instead of staying behind for ever."""
import json
import os
import subprocess
import sys
import time

from hvd_megdet import data
from tests.harness import REPO

# A trainer in one process that takes the loader of rank 0 of 2, sends TERM and USR1 to its workers
# while they start, takes batches, prints its facts and dies at once (os._exit, as app.run after a
# crash).
TRAINER = """
import json, os, signal, sys, time
from hvd_megdet import config, data, signals
signals.stop_flag()
cfg = config.load("shapes_tiny", ["data.shapes_train=16", "data.shapes_val=4", "data.shapes_image_size=64",
                                  "data.min_size=64", "data.max_size=64", "data.root=" + sys.argv[1],
                                  "data.workers=2"])
data.prepare(cfg.data)
it = iter(data.train_loader(data.train_dataset(cfg.data), cfg.data, 2, 0, 2, 0, 0))
pids = [w.pid for w in it._workers]
for p in pids:  # at once: the workers are still starting
    os.kill(p, signal.SIGTERM)
    os.kill(p, signal.SIGUSR1)
for _ in range(8):
    next(it)
ppids = [int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]) for p in pids]
print(json.dumps({"pid": os.getpid(), "workers": pids, "parents": ppids,
                  "alive": all(w.is_alive() for w in it._workers)}), flush=True)
os._exit(1)
"""


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has ended
    except FileNotFoundError:
        return True


def test_start_method():
    assert data.worker_start_method(0, 8) is None and data.worker_start_method(2, 1) is None  # fork as before
    assert data.worker_start_method(2, 2) == "forkserver"


def test_workers_survive_stop_signals_and_end_with_a_crashed_trainer(tmp_path):
    log = tmp_path / "trainer.log"  # a file, not a pipe: workers left behind would hold a pipe open
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, "-c", TRAINER, str(tmp_path / "shapes")], stdout=f,
                              stderr=subprocess.STDOUT, timeout=240, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}).returncode
    text = log.read_text()
    assert code == 1 and text.startswith("{"), text
    facts = json.loads(text.splitlines()[0])
    assert facts["alive"], facts                                        # TERM and USR1 were ignored
    forkserver = set(facts["parents"])
    assert len(forkserver) == 1 and facts["pid"] not in forkserver, facts  # not forked from the trainer
    end = time.time() + 30
    while not all(map(gone, facts["workers"] + list(forkserver))) and time.time() < end:
        time.sleep(0.5)
    left = [p for p in facts["workers"] + list(forkserver) if not gone(p)]
    for p in left:  # do not leave them behind even when failing
        os.kill(p, 9)
    assert not left, f"workers/forkserver outlived their trainer: {left}"
