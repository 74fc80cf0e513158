"""The golden vectors (tests/kernel/vectors) are well formed -- checked on any host; the
kernel replay is tests/kernel/test_compliance_vectors.py."""

import pytest

from tests.kernel import vectorlib


@pytest.mark.parametrize("path", vectorlib.all_vectors(), ids=lambda p: p.stem)
def test_vector_is_valid(path):
    spec = vectorlib.load(path)
    assert vectorlib.expected_transcript(spec)


def test_vector_ids_are_unique_and_at_least_seven():
    ids = [vectorlib.load(p)["id"] for p in vectorlib.all_vectors()]
    assert len(ids) == len(set(ids)) >= 7
