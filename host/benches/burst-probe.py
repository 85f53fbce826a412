#!/usr/bin/env python3
"""How long a commit-log write waits behind a burst of buffered writes.

    python3 host/benches/burst-probe.py DIR MIB PERIOD SECS [plain|pieces|idle-io] [PIECE_KIB]

The main thread does what the journal writer does: a write of 8 KiB into a
64 MiB file written with zeros beforehand, opened `O_DIRECT | O_DSYNC`, every
0.3 ms. A second thread does what a checkpoint (or a flush of the store)
does: it writes MIB MiB into another file through the page cache, syncs it,
and sleeps PERIOD seconds, for SECS seconds in all.

- plain:   the sync sends every dirty page at once;
- pieces:  `sync_file_range` writes the pages out PIECE_KIB (default 256) at
           a time, waiting for each, before the sync;
- idle-io: plain, with the second thread in the idle I/O class.

Prints the log writes' p50, p99, p99.9, max, and how many took over 2 and
over 5 ms. docs/benchmarks.md ("a sixth machine") has figures.
"""

import ctypes
import mmap
import os
import sys
import threading
import time

BLOCK = 4096
RING = 64 << 20
SYNC_FILE_RANGE_ALL = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER
IOPRIO_CLASS_IDLE = 3 << 13


def main():
    folder, mib, period, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    mode = sys.argv[5] if len(sys.argv) > 5 else "plain"
    piece = (int(sys.argv[6]) if len(sys.argv) > 6 else 256) << 10
    libc = ctypes.CDLL(None, use_errno=True)
    ring = os.path.join(folder, f"burst-probe.{os.getpid()}.ring")
    other = os.path.join(folder, f"burst-probe.{os.getpid()}.bg")
    try:
        with open(ring, "wb") as f:
            f.write(bytes(RING))
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(ring, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)
        aligned = mmap.mmap(-1, 2 * BLOCK)
        stop = threading.Event()

        def burst():
            if mode == "idle-io":
                libc.syscall(251, 1, 0, IOPRIO_CLASS_IDLE)  # ioprio_set(WHO_PROCESS, self)
            bg = os.open(other, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            chunk = b"x" * (1 << 20)
            end = 0
            while not stop.is_set():
                start = end
                for _ in range(mib):
                    end += os.write(bg, chunk)
                if mode == "pieces":
                    for at in range(start, end, piece):
                        libc.sync_file_range(bg, ctypes.c_longlong(at), ctypes.c_longlong(piece),
                                             SYNC_FILE_RANGE_ALL)
                os.fdatasync(bg)
                stop.wait(period)
            os.close(bg)

        thread = threading.Thread(target=burst)
        thread.start()
        ms, at, until = [], 0, time.monotonic() + secs
        while time.monotonic() < until:
            t0 = time.perf_counter()
            os.pwritev(fd, [aligned], at)
            ms.append((time.perf_counter() - t0) * 1e3)
            at = (at + 2 * BLOCK) % RING
            time.sleep(0.0003)
        stop.set()
        thread.join()
        os.close(fd)
        ms.sort()
        n = len(ms)
        print(f"{mode} ({piece >> 10} KiB pieces), {mib} MiB every {period} s: {n} log writes, "
              f"p50 {ms[n // 2]:.3f} p99 {ms[n * 99 // 100]:.3f} p99.9 {ms[n * 999 // 1000]:.3f} "
              f"max {ms[-1]:.2f} ms; over 2 ms {sum(x > 2 for x in ms)}, over 5 ms {sum(x > 5 for x in ms)}")
    finally:
        for path in (ring, other):
            if os.path.exists(path):
                os.remove(path)


if __name__ == "__main__":
    main()
