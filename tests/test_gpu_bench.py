"""benchmarks/gpu.py's parts that need no GPU: the profile summary gpu_check.sh prints."""

from pipellm.benchmarks.gpu import main, profile_summary


def test_the_profile_summary_shares_the_copy_engine_threads_samples_without_compiling(tmp_path, capsys):
    raw = tmp_path / "profile.txt"
    raw.write_text(
        "thread (7): pipellm-cuda-copy-engine;_run (pipellm/devices/engine.py:270);stage (pipellm/devices/cuda.py:190) 30\n"
        "thread (7): pipellm-cuda-copy-engine;_run (pipellm/devices/engine.py:270);settle (pipellm/devices/cuda.py:240) 10\n"
        "thread (7): pipellm-cuda-copy-engine;_run (pipellm/devices/engine.py:270);_compile_for_args (numba/cuda/dispatcher.py:1) 500\n"
        "thread (1): MainThread;<module> (target.py:3) 99\n")
    summary = dict((name, share) for share, name in profile_summary(str(raw)))
    assert summary == {"_run (engine.py)": 1.0, "stage (cuda.py)": 0.75, "settle (cuda.py)": 0.25}
    assert main(["--summarize", str(raw)]) == 0
    assert " 75.0%  stage (cuda.py)" in capsys.readouterr().out
    empty = tmp_path / "none.txt"
    empty.write_text("")
    assert profile_summary(str(empty)) == []
