"""How the crash bench decides two stored points are the same."""
from __future__ import annotations

import numpy as np

from bench.common import mismatched, same_vector
from stream.store import Hit


def test_a_half_precision_vector_may_differ_by_one_float16_step_and_no_more() -> None:
    stored = np.array([0.07, -0.3, 0.0009], np.float32)
    step = np.spacing(np.abs(stored).astype(np.float16)).astype(np.float32)
    one_step = stored + step * np.array([1, -1, 1], np.float32)
    assert step[0] == np.float32(2.0 ** -14)  # 6.1e-5: the difference the bench once flagged
    assert same_vector(stored, one_step, atol=1e-5, half=True)
    assert not same_vector(stored, stored + 2.5 * step, atol=1e-5, half=True)
    # Stored as float32, the same difference is a real one.
    assert not same_vector(stored, one_step, atol=1e-5, half=False)
    assert same_vector(stored, stored + 5e-6, atol=1e-5, half=False)
    assert not same_vector(stored, stored[:2], atol=1e-5, half=True)


def test_mismatched_compares_each_named_vector_at_its_stored_precision() -> None:
    text = np.full(4, 0.07, np.float32)
    fused = np.full(4, 0.5, np.float32)
    step = float(np.spacing(np.float16(0.07)))
    reference = {"m1": Hit("m1", 0.0, {"title": "a"}, {"text": text, "fused": fused}),
                 "m2": Hit("m2", 0.0, {"title": "b"}, {"text": text, "fused": fused})}
    other = {"m1": Hit("m1", 0.0, {"title": "a"}, {"text": text + step, "fused": fused}),
             "m2": Hit("m2", 0.0, {"title": "b"}, {"text": text, "fused": fused + step})}
    assert mismatched(reference, other, half=frozenset({"text"})) == ["m2"]
    assert mismatched(reference, other) == ["m1", "m2"]
    assert mismatched(reference, {"m1": other["m1"]}, half=frozenset({"text"})) == ["m2"]
