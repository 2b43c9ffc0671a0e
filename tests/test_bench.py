"""The throughput benchmark's CPU mode writes its report (timings are not tested)."""

import json
import sys

import pytest
import torch
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import throughput  # noqa: E402


def test_cpu_mode_measures_stock_the_peer_patch_this_recipe_and_the_ceiling_in_one_report(tmp_path):
    out = tmp_path / "bench.json"
    variants = ["stock", "peer", "fast+ckpt", "ceiling"]
    throughput.main(["--tiny", "--device", "cpu", "--precision", "fp32", "--batch", "2", "--seconds", "1",
                     "--warmup", "1", "--steps", "2", "--compile_backend", "aot_eager", "--variants", ",".join(variants),
                     "--out", str(out)])
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["results"]] == variants
    for result in report["results"]:
        assert "error" not in result, result
        assert result["audio_s_per_s"] > 0 and result["median_step_s"] > 0
        speed = result["audio_s_per_s"]
        assert result["vs_stock"] == speed / report["results"][0]["audio_s_per_s"]
        assert result["vs_peer"] == speed / report["results"][1]["audio_s_per_s"]
        assert result["vs_ceiling"] == speed / report["results"][3]["audio_s_per_s"]
    assert report["settings"]["tiny"] is True


def test_flop_count_matches_the_wavlm_large_anchor():
    """About 109 GFLOP per audio-second with the CNN frozen (shared/NOTES.md, 15 s utterances)."""
    flops = throughput.training_flops(throughput.WAVLM_LARGE, batch=1, samples=15 * 16000, cnn_trained=False)
    assert 95e9 < flops / 15 < 125e9


def test_the_peer_patch_is_hfs_model_with_need_weights_off_a_frozen_cnn_and_compiled_layers(tiny_wavlm_dir):
    peer = throughput.PeerCTC(str(tiny_wavlm_dir), layerdrop=0.0, cnn_trained=False, backend="aot_eager")
    assert type(peer.wavlm).__name__ == "WavLMModel"  # HF's own model, nothing of this recipe
    assert not peer.wavlm.feature_extractor._requires_grad
    assert all(hasattr(layer, "_orig_mod") for layer in peer.wavlm.encoder.layers)  # torch.compile wrappers
    wav = torch.randn(2, 8000)
    stock = throughput.StockCTC(str(tiny_wavlm_dir), layerdrop=0.0, cnn_trained=False)
    stock.head.load_state_dict(peer.head.state_dict())
    peer.eval(), stock.eval()
    torch.testing.assert_close(peer(wav, torch.ones(2)), stock(wav, torch.ones(2)), rtol=1e-4, atol=1e-5)


def test_an_unknown_variant_is_refused_with_the_choices_before_any_is_measured(tmp_path):
    with pytest.raises(SystemExit, match="one of stock, peer, fast, flex, triton, ceiling"):
        throughput.build("fastest", "unused", None)
    with pytest.raises(SystemExit, match="stock takes no options but \\+compile"):
        throughput.main(["--tiny", "--device", "cpu", "--variants", "fast,stock+graphs", "--out", str(tmp_path / "b.json")])
    assert not (tmp_path / "b.json").exists()
