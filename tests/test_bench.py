"""The throughput benchmark's CPU mode writes its report (timings are not tested)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import throughput  # noqa: E402


def test_cpu_mode_writes_a_report_with_both_variants(tmp_path):
    out = tmp_path / "bench.json"
    throughput.main(["--tiny", "--device", "cpu", "--precision", "fp32", "--batch", "2", "--seconds", "1",
                     "--warmup", "1", "--steps", "2", "--variants", "stock,fast", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["results"]] == ["stock", "fast"]
    for result in report["results"]:
        assert result["audio_s_per_s"] > 0 and result["median_step_s"] > 0
    assert report["results"][0]["vs_stock"] == 1.0
    assert report["settings"]["tiny"] is True


def test_flop_count_matches_the_wavlm_large_anchor():
    """About 109 GFLOP per audio-second with the CNN frozen (shared/NOTES.md, 15 s utterances)."""
    flops = throughput.training_flops(throughput.WAVLM_LARGE, batch=1, samples=15 * 16000, cnn_trained=False)
    assert 95e9 < flops / 15 < 125e9
