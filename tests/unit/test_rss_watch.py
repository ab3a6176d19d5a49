"""RssWatch: the epoch's memory figures, private memory's peak included (Linux /proc)."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest

from scalelab.train.runtime import RssWatch


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_private_memory_peak_counts_what_was_freed_before_the_epoch_ended():
    watch = RssWatch(interval_s=0.005)
    watch.warm()
    block = np.ones(80_000_000, np.uint8)  # 80 MB private, touched, then freed before metrics()
    time.sleep(0.1)
    del block
    time.sleep(0.05)
    m = watch.metrics()
    assert m["rss_anon_growth_mb"] >= 70, m  # the sampled peak saw it
    assert m["rss_anon_mb"] < m["peak_rss_anon_mb"] - 70, m  # the end-of-epoch value alone would not
    assert m["peak_rss_anon_mb"] == pytest.approx(m["rss_anon_warm_mb"] + m["rss_anon_growth_mb"])
    assert m["peak_rss_mb"] >= m["peak_rss_anon_mb"] and m["peak_rss_shmem_mb"] >= 0
