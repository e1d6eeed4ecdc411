"""benchmarks/cpu_probe_parts.py on tiny shapes: its variants agree (it checks the pooling's values and arg
tokens against the former arg-max formulation, and both attention score orders) and it reports each one."""

from benchmarks import cpu_probe_parts


def test_cpu_probe_parts_runs_and_reports_every_variant():
    argv = ["--batch", "4", "--tokens", "8", "--prototypes", "7", "--dim", "12", "--heads", "3"]
    result = cpu_probe_parts.main([*argv, "--rounds", "1", "--iters", "1"])
    assert set(result["pooling_ms"]) == {"job_chunks", "one_chunk", "argmax_gather"}
    assert set(result["attention_ms"]) == {"bhkq", "bhqk"}
    assert all(t > 0 for t in [*result["pooling_ms"].values(), *result["attention_ms"].values()])
