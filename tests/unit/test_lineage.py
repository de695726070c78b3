"""The lineage blob stored with each version: compressed incrementally, always equal to the JSON of
the whole run list (as the registry stored it before), through the run cap and a checkpoint."""

from __future__ import annotations

import json
import pickle
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from services.learner import core
from services.learner.core import Lineage

steps = st.lists(st.one_of(
    st.tuples(st.sampled_from(["features", "labels"]), st.integers(0, 2), st.integers(0, 3)),  # record
    st.just("blob"), st.just("checkpoint")), max_size=300)


@settings(max_examples=150, deadline=None)
@given(steps)
def test_blob_always_equals_the_whole_lineage(ops):
    original = core.MAX_LINEAGE_RUNS
    core.MAX_LINEAGE_RUNS = 40  # the cap drops the oldest runs: the stream starts again
    try:
        lineage, next_offset = Lineage(), {}
        for step in ops + ["blob"]:
            if step == "checkpoint":
                lineage = pickle.loads(pickle.dumps(lineage))  # what a restart restores
            elif step == "blob":
                assert json.loads(zlib.decompress(lineage.blob())) == {"runs": lineage.runs,
                                                                       "truncated": lineage.truncated}
            else:
                topic, partition, gap = step
                offset = next_offset.get((topic, partition), 0) + gap
                lineage.record(topic, partition, offset)
                next_offset[(topic, partition)] = offset + 1
    finally:
        core.MAX_LINEAGE_RUNS = original


def test_the_compressor_is_not_part_of_the_checkpoint():
    lineage = Lineage()
    for offset in range(100):
        lineage.record("labels" if offset % 3 else "features", offset % 2, offset)
    lineage.blob()
    restored = pickle.loads(pickle.dumps(lineage))
    assert restored._stream is None and restored.runs == lineage.runs
    assert zlib.decompress(restored.blob()) == zlib.decompress(lineage.blob())
