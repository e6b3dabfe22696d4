"""The host memory the trainer logs (mem/host_max_rss_gib) and bench_peers records: this process's own peak."""

import subprocess
import sys

from t2i_ds.trainer.metrics import host_peak_rss_gib

GIB = 2**30
CHILD = ("import resource; from t2i_ds.trainer.metrics import host_peak_rss_gib; "
         "print(host_peak_rss_gib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)")


def _touched(n_bytes: int) -> bytearray:
    buf = bytearray(n_bytes)
    buf[::4096] = b"\x01" * len(range(0, n_bytes, 4096))  # every page resident
    return buf


def _rss_now_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 2**20


def test_own_peak_covers_what_this_process_holds():
    buf = _touched(GIB // 2)
    now = _rss_now_gib()
    assert now >= 0.5 and host_peak_rss_gib() >= now, (now, host_peak_rss_gib())
    del buf


def test_a_child_of_a_large_process_reports_its_own_peak_not_the_parents():
    """ru_maxrss survives exec on Linux: the child would report at least this process's 1.5 GiB."""
    buf = _touched(3 * GIB // 2)
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, check=True).stdout
    own, ru_maxrss = map(float, out.split())
    del buf
    assert ru_maxrss >= 1.5, ru_maxrss  # the pitfall is real here (else this test shows nothing)
    assert own < 1.0, own  # torch and the metrics module: a few hundred MiB
