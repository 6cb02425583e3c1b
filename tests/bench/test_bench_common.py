"""The benchmark harness: interleaved timing with untimed warm-up rounds."""

from bench.common import interleave


def test_interleave_runs_warmup_rounds_first_and_does_not_count_them():
    calls: list[tuple[str, int]] = []

    def case(label):
        def fn(i):
            calls.append((label, i))
            return f"{label}{i}"
        return fn

    out = interleave({"a": (case("a"), 2), "b": (case("b"), 1)}, warmup=1)
    # warm-up round (i=0) of every case, then the timed repeats round-robin, numbering continued
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2)]
    assert out["a"].results == ["a1", "a2"] and out["b"].results == ["b1"]
    assert len(out["a"].times) == 2 and len(out["a"].warmup_times) == 1
    assert "warmup_times_s" in out["a"].as_dict(10) and "warmup_times_s" not in interleave({"c": (case("c"), 1)})["c"].as_dict()
