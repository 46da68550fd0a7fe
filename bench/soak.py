"""A soak under faults: thousands of mixed operations against the real stack, faults thrown in at random.

    .venv/bin/python bench/soak.py [--ops 2000 | --minutes M] [--seed N] [--max-mib 256]

Starts SeaweedFS and the reference Resource API (devstack) with a fault proxy in front of SeaweedFS, a
private dockerd (root needed) and the loader as `python main.py`, then runs devstack.soak: cold and warm
loads of models of 1 KiB to 256 MiB (up to 8 at once), uploads of new versions, logins as every role,
unlocks, prefetches followed to their end through /downloads, reads of /downloads, /status and /metrics,
with CDN, Resource API, disk, loader and dockerd faults drawn between them, every answer checked against
the contract. The loader's cache budget (MODEL_CACHE_MAX_BYTES) holds only part of the models, so parts are
evicted as others come. The same seed replays the same operations and faults.
Prints the operations and faults by kind, latencies, the cache's evictions and the prefetches, the loader's
memory and descriptors, every violation, and last the RESULT line:

    RESULT soak_ops=<n> violations=<n> rss_growth_mb=<n> fd_growth=<n> p99_load_ms=<n> evictions=<n>
           prefetches=<n>

Exits 1 when there was a violation.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devstack.processes.dockerd import Dockerd  # noqa: E402
from devstack.processes.faultproxy import FaultProxy  # noqa: E402
from devstack.soak.engine import BENCH_SIZES, Soak, SoakConfig  # noqa: E402
from devstack.stack import Stack  # noqa: E402


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    how_long = parser.add_mutually_exclusive_group()
    how_long.add_argument("--ops", type=int, default=None, help="operations to run (default 2000)")
    how_long.add_argument("--minutes", type=float, default=None, help="run this long instead")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-mib", type=int, default=256, help="leave out models larger than this")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--fault-rate", type=float, default=0.07, help="chance of a fault per operation")
    parser.add_argument(
        "--cache-fraction",
        type=float,
        default=0.5,
        help="MODEL_CACHE_MAX_BYTES as this share of all the models' big parts (at least the largest and a "
        "quarter more)",
    )
    parser.add_argument(
        "--loader-env", action="append", default=[], metavar="NAME=VALUE", help="for the loader"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (kept after a violation)"
    )
    args = parser.parse_args()
    if args.ops is None and args.minutes is None:
        args.ops = 2000
    return args


def main():
    args = arguments()
    sizes = tuple(s for s in BENCH_SIZES if s <= args.max_mib * 1024 * 1024)
    config = SoakConfig(
        seed=args.seed,
        ops=args.ops,
        minutes=args.minutes,
        sizes=sizes,
        concurrency=args.concurrency,
        fault_rate=args.fault_rate,
        cache_fraction=args.cache_fraction,
        loader_env=dict(pair.split("=", 1) for pair in args.loader_env),
    )
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    engine = Dockerd()
    report = None
    try:
        engine.start()
        with Stack(work / "stack") as stack, FaultProxy(stack.s3_endpoint) as proxy:
            report = Soak(config, work / "soak", stack, proxy, engine).run()
        print("\n".join(report.lines()))
    finally:
        engine.cleanup()
        if args.keep or report is None or report.violations:
            print(f"kept {work} (loader log: {work}/soak/loader/loader-*.log)", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if report.violations else 0)


if __name__ == "__main__":
    main()
