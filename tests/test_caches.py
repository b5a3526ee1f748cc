"""Caches under load: modules shared between threads compute what serial calls compute, and
2,000 forward passes over images, sequences and graphs of ever-changing sizes keep every
cache within its bound and the process's memory flat."""
import contextlib
import gc
import pickle
import random
from concurrent.futures import ThreadPoolExecutor

import numba
import pytest
import torch

from treessm import GridTopology
from treessm.nn import GrootLMixer, TreeSSM, TreeSSMConv
from treessm.topology import sequence
from treessm.topology.base import BoundedCache, CandidateCache
from treessm.topology.cuda_grid import fused_ready


@contextlib.contextmanager
def single_threaded():
    """One torch and one numba thread: the passes are tiny, and on a loaded machine
    spinning thread pools would make them many times slower."""
    saved = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        numba.set_num_threads(saved[1])


def _image(rng, c=4):
    return torch.randn(rng.randint(1, 2), rng.randint(1, 14), rng.randint(1, 14), c)


def _sequence(rng, c=4):
    return torch.randn(rng.randint(1, 2), rng.randint(1, 40), c)


def _graph(rng, c=4):
    n = rng.randint(1, 80)
    return torch.randn(n, c), torch.randint(0, n, (2, rng.randint(0, 3 * n)))


def _modules():
    torch.manual_seed(0)
    return (TreeSSM(4).eval(), GrootLMixer(4, state_size=2, mode="paper").eval(),
            GrootLMixer(4, state_size=2, mode="causal").eval(), TreeSSMConv(4, 4, d_state=1).eval())


def _pass(modules, rng):
    """One forward pass of one of the modules on a fresh random input."""
    image, paper, causal, conv = modules
    kind = rng.randrange(4)
    if kind == 0:
        return image(_image(rng))
    if kind == 1:
        return paper(_sequence(rng))
    if kind == 2:
        return causal(_sequence(rng))
    return conv(*_graph(rng))


def _threading_layer() -> str:
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return "unknown"


def test_modules_shared_between_threads():
    modules = _modules()
    rng = random.Random(1)
    inputs = [(i % 4, args) for i, args in enumerate(
        (_image(rng),) if k == 0 else (_sequence(rng),) if k in (1, 2) else _graph(rng)
        for k in [j % 4 for j in range(48)])]

    def call(item):
        kind, args = item
        return modules[kind](*args)

    with torch.no_grad():
        serial = [call(item) for item in inputs]
        if _threading_layer() == "workqueue":
            pytest.skip("numba's workqueue threading layer cannot run parallel kernels from "
                        "several threads; install tbb or use OpenMP")
        for _ in range(2):
            with ThreadPoolExecutor(4) as pool:
                threaded = list(pool.map(call, inputs))
            for a, b in zip(threaded, serial):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_topology_cache_evicting_while_threads_read_it():
    # a cache of 3 entries and 24 shapes: entries leave while other threads use them
    topology = GridTopology()
    topology._cache = CandidateCache(size=3)
    rng = random.Random(3)
    feats = [torch.randn(rng.randint(1, 2), rng.randint(1, 9), rng.randint(1, 9), 3)
             for _ in range(24)]
    serial = [GridTopology()(f).parent for f in feats]
    topology(feats[0])  # compiled before the threads start
    with ThreadPoolExecutor(6) as pool:
        for _ in range(3):
            for got, expected in zip(pool.map(lambda f: topology(f).parent, feats), serial):
                assert torch.equal(got, expected)
    assert len(topology._cache) <= 3


def test_bounded_cache():
    cache = BoundedCache(3, max_weight=10, weigh=len)
    made = []

    def make(value):
        made.append(value)
        return value

    assert cache.get("a", lambda: make("aaaa")) == "aaaa"
    assert cache.get("a", lambda: make("other")) == "aaaa" and made == ["aaaa"]
    cache.get("b", lambda: make("bbbb"))
    cache.get("c", lambda: make("cc"))
    assert len(cache) == 3 and cache.weight == 10
    cache.get("d", lambda: make("d"))  # too heavy together: the oldest leaves
    assert len(cache) == 3 and cache.weight == 7
    assert cache.get("a", lambda: make("new")) == "new"
    assert cache.get("x", lambda: "x" * 11) == "x" * 11 and "x" * 11 not in made  # too heavy
    assert cache.weight <= 10 and len(cache) <= 3
    clone = pickle.loads(pickle.dumps(cache))
    assert len(clone) == 0 and clone.max_weight == 10 and clone.weigh is len


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _live_tensors() -> int:
    # type(), not isinstance(): the latter asks dead weak proxies for their class
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="Linux only")
def test_soak_caches_bounded_and_memory_flat():
    modules = _modules()
    rng = random.Random(2)
    with torch.no_grad(), single_threaded():
        for _ in range(500):  # every kernel compiled, every cache filled
            _pass(modules, rng)
        gc.collect()
        rss, tensors = _rss_bytes(), _live_tensors()
        for _ in range(1500):
            _pass(modules, rng)
        gc.collect()
        grown, new_tensors = _rss_bytes() - rss, _live_tensors() - tensors
    for module in modules:
        cache = getattr(module.topology, "_cache", None)
        if cache is not None:
            assert len(cache) <= cache.size
    chains = sequence._CHAINS
    assert len(chains) <= chains.max_entries and chains.weight <= chains.max_weight
    assert fused_ready.cache_info().currsize <= fused_ready.cache_info().maxsize
    # a tree or a candidate graph kept per pass would add 1,500 tensors and megabytes
    assert new_tensors <= 20, new_tensors
    assert grown < 16 * 2 ** 20, f"resident memory grew by {grown / 2 ** 20:.1f} MiB"
