"""`make demo` end to end with tiny budgets (the real budgets are timed in BENCHMARKS.md)."""

import json

import pytest

from lavin_jax import demo


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path):
    argv = ["--workdir", str(tmp_path), "--vae_steps", "4", "--jdit_steps", "4",
            "--cache_episodes", "8", "--eval_examples", "2", "--ti_examples", "2"]
    assert demo.main(argv) == 0
    s = json.loads((tmp_path / "demo_summary.json").read_text())
    assert (tmp_path / "samples.png").stat().st_size > 0
    assert s["jdit"]["loss"]["steps"] == 4 and s["stvae"]["vae_step"] == 4
    tasks = {r["task"] for r in s["tasks"]}
    from configs import lavin_dit

    assert tasks == set(lavin_dit.DEMO_TASKS)
    for r in s["tasks"]:
        assert set(r) >= {"task", "metric", "value", "baseline", "higher_is_better"}
    assert 0.0 <= s["task_identification_accuracy"] <= 1.0
    assert len(s["task_identification"]["tasks"]) >= 2
