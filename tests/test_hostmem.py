"""hal.hostmem: the cpu cache's memory asks for 2 MiB pages and is still plain zeros."""

import pytest
import torch

from hal import hostmem


def test_zeros_is_zeros_of_the_shape():
    t = hostmem.zeros(3, 5 << 20, dtype=torch.uint8)  # 15 MiB: large enough to be advised
    assert t.shape == (3, 5 << 20) and t.dtype == torch.uint8
    assert int(t.count_nonzero()) == 0
    small = hostmem.zeros(2, 3, dtype=torch.bfloat16)
    assert small.shape == (2, 3) and not small.any()


def test_advise_needs_a_whole_huge_page():
    assert hostmem.advise(torch.empty(1000, dtype=torch.uint8)) is False  # no 2 MiB page inside


@pytest.mark.skipif(hostmem.status() not in ("always", "madvise"), reason="transparent huge pages off here")
def test_a_large_buffer_lands_on_huge_pages():
    t = hostmem.zeros(64 << 20, dtype=torch.uint8)
    got = hostmem.huge_bytes(t)
    if got is None:
        pytest.skip("/proc/self/smaps not readable")
    assert got >= 2 * hostmem.HUGE_PAGE, f"only {got} bytes of a 64 MiB buffer on huge pages"


def test_cpu_cache_rows_are_advised():
    import hal

    if hostmem.status() not in ("always", "madvise"):
        pytest.skip("transparent huge pages off here")
    spec = hal.KVCacheSpec(2, 8, 128, block_size=16, dtype="bf16")
    cache = hal.KVCache(spec, 1024, backend="cpu")  # 2 x 64 MiB of rows
    rows = cache.storage.rows[0]
    got = hostmem.huge_bytes(rows)
    if got is None:
        pytest.skip("/proc/self/smaps not readable")
    assert got >= 2 * hostmem.HUGE_PAGE
