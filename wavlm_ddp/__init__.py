"""The library behind the recipe (train.py, wavlm_wrapper.py, launch_ddp.sh).

    encoder/    the speech encoder: loading and the YAML's overrides, LayerDrop that
                every rank draws alike, WavLM's attention paths, per-layer compile
    data/       manifests and HF datasets, audio, the tokenizer, the data check
    training/   the Brain's SpeechBrain overrides, the global batch and schedules,
                the step and epoch reports
    faults/     checkpoints, the non-finite guard and watchdog, preemption, the folder lock
    decoding/   greedy and beam search with an n-gram LM, the LM estimator
    distributed.py, preflight.py   the process group; the checks before step 1
    inference.py                   a finished run or an HF export as a transcriber

Commands: `python -m wavlm_ddp.transcribe | tune_decoding | export_hf | build_lm`
(or the console scripts `wavlm-ddp-transcribe`, ... that pyproject installs).
"""
