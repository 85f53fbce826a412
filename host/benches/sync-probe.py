#!/usr/bin/env python3
"""How long a small durable write takes on this file system, four ways.

    python3 host/benches/sync-probe.py [DIR] [COUNT]

Writes COUNT (default 2,000) blocks of 4 KiB into a file in DIR (default:
the current directory; use the data directory's file system) and times each
write plus its sync:

- append + fdatasync: a growing file, as fjall's journal is written;
- overwrite + fdatasync: a file written with zeros and synced beforehand;
- overwrite, O_DIRECT | O_DSYNC: the same file, bypassing the page cache;
- fallocate + overwrite + fdatasync: space reserved but never written.

Prints p50, p90, p99 and max in ms per way. docs/benchmarks.md ("Short
scheduler slices, the sync under load, and a log of our own") has figures
and what they say.
"""
import mmap
import os
import sys
import time

BLOCK = 4096


def report(name, ms):
    ms.sort()
    n = len(ms)
    print(f"{name:36s} p50 {ms[n // 2]:.3f}  p90 {ms[n * 9 // 10]:.3f}  "
          f"p99 {ms[n * 99 // 100]:.3f}  max {ms[-1]:.2f} ms")


def timed(count, step):
    out = []
    for i in range(count):
        t = time.perf_counter()
        step(i)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "."
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    path = os.path.join(folder, f"sync-probe.{os.getpid()}")
    block = b"x" * BLOCK
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
        report("append + fdatasync", timed(count, lambda i: (os.write(fd, block), os.fdatasync(fd))))
        os.close(fd)

        fd = os.open(path, os.O_RDWR | os.O_TRUNC)
        os.write(fd, bytes(count * BLOCK))
        os.fsync(fd)
        report("overwrite + fdatasync",
               timed(count, lambda i: (os.pwrite(fd, block, i * BLOCK), os.fdatasync(fd))))
        os.close(fd)

        # O_DIRECT wants an aligned buffer: an anonymous map is page-aligned.
        try:
            fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
        except OSError as e:  # tmpfs and some others refuse O_DIRECT
            print(f"{'overwrite, O_DIRECT | O_DSYNC':36s} not supported here: {e.strerror}")
        else:
            aligned = mmap.mmap(-1, BLOCK)
            aligned.write(block)
            report("overwrite, O_DIRECT | O_DSYNC",
                   timed(count, lambda i: os.pwritev(fd, [aligned], i * BLOCK)))
            os.close(fd)
        os.remove(path)

        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        os.posix_fallocate(fd, 0, count * BLOCK)
        os.fsync(fd)
        report("fallocate + overwrite + fdatasync",
               timed(count, lambda i: (os.pwrite(fd, block, i * BLOCK), os.fdatasync(fd))))
        os.close(fd)
    finally:
        if os.path.exists(path):
            os.remove(path)


if __name__ == "__main__":
    main()
