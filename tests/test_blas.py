"""sdtk.blas.limited: every loaded OpenBLAS computes on at most n threads inside the block, and
gets its own count back afterwards, also when the block raises."""
import contextlib

import numpy as np
import pytest

from sdtk import blas


@pytest.fixture
def two_threads():
    """Every loaded OpenBLAS (numpy's, and SciPy's once limited() loaded it) set to 2 threads
    for the test (whatever the machine's core count), the original counts restored after."""
    with contextlib.suppress(ImportError):
        import scipy.linalg.blas  # noqa: F401  (limited() loads it too)
    controls = blas._controls()
    if not controls:
        pytest.skip("no OpenBLAS with a thread-count API is loaded (MKL or another BLAS)")
    saved = [(setter, getter()) for setter, getter in controls]
    for setter, _ in saved:
        setter(2)
    if blas.thread_counts() != [2] * len(controls):
        pytest.skip("this OpenBLAS was built single-threaded")
    yield len(controls)
    for setter, old in saved:
        setter(old)


def test_one_thread_inside_and_the_old_count_after(two_threads):
    assert blas.thread_counts() == [2] * two_threads
    with blas.limited(1):
        assert blas.thread_counts() == [1] * two_threads
        a = np.ones((64, 64))
        assert float((a @ a)[0, 0]) == 64.0  # BLAS still computes inside
    assert blas.thread_counts() == [2] * two_threads


def test_counts_restored_when_the_block_raises(two_threads):
    with pytest.raises(ZeroDivisionError):
        with blas.limited(1):
            assert blas.thread_counts() == [1] * two_threads
            1 / 0
    assert blas.thread_counts() == [2] * two_threads


def test_nested_blocks_and_a_higher_limit_leave_counts_alone(two_threads):
    with blas.limited(4):  # never raises a count
        assert blas.thread_counts() == [2] * two_threads
    with blas.limited(1):
        with blas.limited(1):
            assert blas.thread_counts() == [1] * two_threads
        assert blas.thread_counts() == [1] * two_threads  # the outer block still holds
    assert blas.thread_counts() == [2] * two_threads
