"""heap: the process heap: two malloc arenas, and the heap trimmed once the loader is idle after a load."""

import os
import subprocess
import sys
import threading
from pathlib import Path

from fastapi.testclient import TestClient

import heap
import main
from devstack.wait import until

ROOT = Path(__file__).resolve().parent.parent

# Sixteen threads allocate at once, then glibc's malloc_info tells how many arenas the process made.
ARENAS = """
import ctypes, os, sys, tempfile, threading
import heap
if sys.argv[1] == "limited":
    heap.tune_malloc()
both = threading.Barrier(16)
def allocate():
    both.wait()
    held = [os.urandom(300_000) for _ in range(20)]
    both.wait()
threads = [threading.Thread(target=allocate) for _ in range(16)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile() as f:
    out = ctypes.c_void_p(libc.fopen(f.name.encode(), b"w"))
    libc.malloc_info(0, out)
    libc.fclose(out)
    print(open(f.name).read().count("<heap nr="))
"""

# Two 12 MiB chunks allocated, then freed: glibc's mallinfo2 tells the bytes mapped from the OS for single
# chunks (hblkhd) while they live, and the free bytes the heap keeps (fordblks) after.
MALLINFO = """
import ctypes, sys
import heap
if sys.argv[1] == "tuned":
    heap.tune_malloc()
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
chunks = [bytearray(12 * 2**20) for _ in range(2)]
mapped = libc.mallinfo2().hblkhd
del chunks
print(mapped, libc.mallinfo2().fordblks)
"""


def test_heap_is_compiled():
    assert heap.__file__.endswith(".so")


def run_heap_script(script, mode, drop=()):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    out = subprocess.run(
        [sys.executable, "-c", script, mode], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def test_multi_mib_chunks_come_from_the_heap_and_stay_there_until_trimmed():
    """A cold load's 4 MiB blocks of plaintext were mapped afresh from the OS again and again (about 60,000
    page faults a GiB): tune_malloc() has chunks up to 32 MiB come from the heap, and keeps up to 64 MiB of
    free heap for the next ones (MemoryTrim hands it back once the loader is idle)."""
    drop = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    mapped, kept = map(int, run_heap_script(MALLINFO, "default", drop))
    assert mapped >= 24 * 2**20 and kept < 2**20  # the test can tell: left alone, glibc maps them
    mapped, kept = map(int, run_heap_script(MALLINFO, "tuned", drop))
    assert mapped < 2**20 and kept >= 24 * 2**20


def test_the_loader_keeps_to_two_malloc_arenas():
    """The soak found the loader's RSS at rest growing by ~200 MB over a run: each of many threads' own
    glibc arena kept the multi-MiB chunks freed in it. main() now limits the arenas to two."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}

    def arenas(mode):
        out = subprocess.run(
            [sys.executable, "-c", ARENAS, mode],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return int(out.stdout)

    assert arenas("default") > 2  # the test can tell: left alone, glibc makes more
    assert arenas("limited") <= heap.MALLOC_ARENAS


def test_the_heap_is_trimmed_once_the_loader_is_idle_after_a_load(loader_env):
    """The soak found the loader's RSS at rest climbing to ~200 MB over a run and staying there: glibc keeps
    the chunks loads and uploads freed. Once idle after a load or upload, the loader calls malloc_trim."""
    trims = []
    memory = heap.MemoryTrim(trim=trims.append, delay=0.05)
    with TestClient(
        main.create_app(memory), base_url="http://localhost", raise_server_exceptions=False
    ) as client:
        assert client.get("/health").status_code == 200
        assert not memory.dirty  # a light request leaves nothing to trim
        assert client.post("/load/m.bin", json={"folder": "models"}).status_code == 401
        until(lambda: trims, what="no trim after the load")
    assert trims == [0] and not memory.dirty and memory.busy == 0


def test_the_loads_budget_makes_a_reservation_wait_until_room_is_freed():
    budget = heap.Budget(100)
    first = budget.reserve(60)
    got = []
    waiter = threading.Thread(target=lambda: got.append(budget.reserve(60)), daemon=True)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not got and budget.waiting == 1  # it waits, it does not fail
    first.release()
    waiter.join(5)
    assert got and budget.left == 40
    got[0].release()
    got[0].release()  # a second release gives nothing back twice
    assert budget.left == 100


def test_a_reservation_larger_than_the_budget_takes_the_whole_budget_instead_of_waiting_for_ever():
    budget = heap.Budget(100)
    whole = budget.reserve(1000)
    assert whole.size == 100 and budget.left == 0
    whole.release()
    budget.resize(300)
    assert budget.reserve(250).size == 250 and budget.left == 50


def test_try_take_takes_only_room_that_is_free_and_that_nobody_waits_for():
    """What helps but is not needed (a second fetcher's buffer, a block held for a load) never keeps room
    from a holder that needs it: try_take refuses while anyone waits, even with room left."""
    budget = heap.Budget(100)
    taken = budget.try_take(30)
    assert taken is not None and taken.size == 30 and budget.left == 70
    assert budget.try_take(71) is None and budget.left == 70  # not free
    first = budget.reserve(60)
    got = []
    waiter = threading.Thread(target=lambda: got.append(budget.reserve(60)), daemon=True)
    waiter.start()
    until(lambda: budget.waiting == 1)
    assert budget.left == 10 and budget.try_take(10) is None  # free, but someone waits for room
    taken.release()
    first.release()
    waiter.join(5)
    assert got and budget.waiting == 0 and budget.left == 40
    more = budget.try_take(40)
    assert more is not None and budget.left == 0
    for r in (more, got[0]):
        r.release()
    assert budget.left == 100


def test_a_reservation_that_must_not_wait_goes_beyond_the_budget():
    """reserve(wait=False) (a load mid-stream that must start a download) takes its room at once, even past
    the budget; nothing else gets room until the budget is back under."""
    budget = heap.Budget(100)
    held = budget.reserve(80)
    over = budget.reserve(50, wait=False)
    assert over.size == 50 and budget.left == -30
    assert budget.try_take(1) is None
    held.release()
    assert budget.left == 50 and budget.try_take(50) is not None
    over.release()
    assert budget.left == 50


def test_downloads_and_loads_share_the_one_budget(tmp_path):
    import binary_split
    import model_cache

    assert binary_split.ModelStore(None, None)._memory is heap.buffers
    assert model_cache.BigPartCache(tmp_path).buffers is heap.buffers
