"""Checks that run before the first training step and turn a misconfiguration
into one line that names the key or flag to change.

Each check raises `ConfigError`; `train.py` prints its message and exits with
status 2, so no traceback and no half-started run reaches the user.
"""

import difflib
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

TRUE_WORDS = {"true", "1", "yes", "on"}
FALSE_WORDS = {"false", "0", "no", "off"}

# The message PyTorch's DDP reducer raises when a parameter got no gradient.
REDUCTION_ERROR = "Expected to have finished reduction in the prior iteration"


class ConfigError(ValueError):
    """A configuration that cannot train; the message names the fix."""


def parse_bool(key, value):
    """`True`/`False` (any case), 1/0, yes/no, on/off, or a bool."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(f"--{key}={value} is not a boolean: use --{key}=True or --{key}=False")


def pop_bool_flag(argv, key):
    """Remove `--key[=X]` from `argv` and return (value, rest); value is None when
    the flag is absent. For flags that SpeechBrain's parser does not take as
    `--key=False` (find_unused_parameters is a bare switch there) or not at all."""
    value, rest = None, []
    for arg in argv:
        name, _, text = arg.partition("=")
        if name == f"--{key}":
            value = parse_bool(key, text if text else True)
        else:
            rest.append(arg)
    return value, rest


def pop_int_flag(argv, key):
    """Remove `--key=N` from `argv` and return (N, rest); N is None when absent."""
    value, rest = None, []
    for arg in argv:
        name, _, text = arg.partition("=")
        if name == f"--{key}":
            if not text.isdigit() or int(text) < 1:
                raise ConfigError(f"--{key}={text} is not a positive integer: use --{key}=2, for example")
            value = int(text)
        else:
            rest.append(arg)
    return value, rest


def resolve_find_unused_parameters(requested, distributed, wavlm):
    """The `find_unused_parameters` value to give DDP.

    requested: the user's value (command line, else YAML), or None when unset.
    Under DDP, LayerDrop leaves the dropped layers without gradient, which DDP
    only tolerates with `find_unused_parameters=True`.
    """
    if not distributed:
        return bool(requested)
    if wavlm.unused_parameters_expected():
        check_find_unused_parameters(requested, 2, wavlm.layerdrop, wavlm.freeze)
        if requested is None:
            logger.info(
                f"find_unused_parameters=True set automatically: layerdrop={wavlm.layerdrop} "
                "leaves the dropped layers without gradient"
            )
        return True
    if requested:
        logger.info(
            "find_unused_parameters=True is unnecessary here (layerdrop=0 and no unused "
            "parameter): set --find_unused_parameters=False to skip DDP's graph search"
        )
        return True
    return False


def check_find_unused_parameters(requested, world_size, layerdrop, freeze):
    """Refuse, before any worker starts, DDP without find_unused_parameters when
    LayerDrop leaves trainable layers without gradient."""
    if requested is False and world_size > 1 and layerdrop > 0 and freeze != "all":
        raise ConfigError(
            f"layerdrop={layerdrop} skips encoder layers, whose parameters then get "
            "no gradient, which DDP refuses: set --find_unused_parameters=True "
            "(or leave it unset), or --layerdrop=0.0"
        )


def check_sharded_backend(layerdrop, env=None):
    """FSDP and DeepSpeed ZeRO-3 make HF run every layer (LayerDrop silently off)
    and this recipe supports plain DDP only: refuse when either is detected."""
    env = os.environ if env is None else env
    detected = [
        name
        for name, flag in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
        if parse_bool(flag, env.get(flag, "false"))
    ]
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            detected.append("DeepSpeed ZeRO-3")
    except ImportError:
        pass
    if detected and layerdrop > 0.0:
        raise ConfigError(
            f"{' and '.join(detected)} detected: HF runs every layer there, so layerdrop="
            f"{layerdrop} would silently do nothing; this recipe trains with DDP: unset "
            "ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED, or set --layerdrop=0.0"
        )
    return detected


def explain_reduction_error(error):
    """Turn DDP's unused-parameter error into one line naming the fix."""
    if REDUCTION_ERROR in str(error):
        return ConfigError(
            "a parameter got no gradient under DDP (LayerDrop, a frozen branch, or an unused "
            "module): set --find_unused_parameters=True"
        )
    return error


PRECISIONS = ("fp32", "fp16", "bf16")
LAYERDROP_MODES = ("synced", "independent")


def check_choice(key, value, choices):
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}: set --{key} to one of them")


def check_positive_int(key, value, example):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r} is not a positive integer: set --{key} to one, such as {example}")


def check_layerdrop(layerdrop):
    if not isinstance(layerdrop, (int, float)) or not 0.0 <= layerdrop < 1.0:
        raise ConfigError(f"layerdrop={layerdrop} is outside [0, 1): set --layerdrop to a probability "
                          "such as 0.1 (0.0 disables LayerDrop)")


# Numeric keys and what they must be: (lowest allowed, whether that bound is
# excluded, integer?, an example value for the message). max_duration may also be
# null (no length limit), gpu_speed null (not measured: the start prints no GPU-hours).
NUMBERS = {
    "number_of_epochs": (1, False, True, 20),
    "gpu_speed": (0, True, False, 1593.0),
    "max_duration": (0, True, False, 20.0),
    "min_samples": (1, False, True, 400),
    "sample_rate": (1, False, True, 16000),
    "duration_tolerance": (0, False, False, 0.1),
    "vocab_size": (1, False, True, 40),
    "batches_per_bucket": (1, False, True, 10),
    "max_grad_norm": (0, True, False, 5.0),
    "nonfinite_patience": (1, False, True, 3),
    "ckpt_interval_minutes": (0, False, False, 30),
    "ckpt_interval_steps": (0, False, True, 0),
    "keep_latest_checkpoints": (1, False, True, 2),
    "layerdrop_check_interval": (0, False, True, 100),
    "lm_order": (1, False, True, 3),
    "check_workers": (1, False, True, 8),
    "lock_stale_minutes": (0, True, False, 10),
    "dynamic_batch_sampler.max_batch_length": (0, True, False, 200.0),
    "dynamic_batch_sampler.num_buckets": (1, False, True, 60),
}


def check_numbers(hparams):
    """Every numeric key in its range, before anything is built: one line naming
    the key and a value that works (`--key=value`, or the nested form)."""
    for name, (low, exclusive, integer, example) in NUMBERS.items():
        outer, _, inner = name.partition(".")
        if outer not in hparams or (inner and inner not in (hparams[outer] or {})):
            continue
        value = hparams[outer][inner] if inner else hparams[outer]
        if value is None and name in ("max_duration", "gpu_speed"):
            continue  # no length limit; no cost estimate
        kind = "an integer" if integer else "a number"
        ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
        ok = ok and (value > low if exclusive else value >= low)
        if not ok:
            fix = f"--{outer}='{{{inner}: {example}}}'" if inner else f"--{name}={example}"
            raise ConfigError(f"{name}={value!r} is not {kind} {'>' if exclusive else '>='} {low:g}: "
                              f"set {fix}")


def encoder_keyword(hparams, name, default=False):
    """The value the encoder gets for `name`: the `wavlm:` block's keyword (what
    SpeechEncoder is built with), else the top-level key, else `default`."""
    keywords = getattr(hparams.get("wavlm"), "keywords", {})
    return keywords.get(name, hparams.get(name, default))


def check_hparams(hparams, precision, device):
    """Checks of the YAML values (after command-line overrides), before anything
    is built or written."""
    check_numbers(hparams)
    layerdrop = hparams["layerdrop"]
    check_layerdrop(layerdrop)
    check_choice("layerdrop_mode", hparams["layerdrop_mode"], LAYERDROP_MODES)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision} is unknown: set --precision to one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and not str(device).startswith("cuda"):
        raise ConfigError(f"precision=fp16 needs a CUDA GPU (device is {device}): set --precision=bf16 or fp32")
    if hparams.get("attention") == "flex" and not str(device).startswith("cuda"):
        raise ConfigError(f"attention=flex needs a CUDA GPU (device is {device}; FlexAttention has no backward on "
                          "the CPU): set --attention=sdpa")
    if encoder_keyword(hparams, "cuda_graphs") and not str(device).startswith("cuda"):
        raise ConfigError(f"cuda_graphs=True needs a CUDA GPU (device is {device}): set --cuda_graphs=False")
    if hparams.get("attention") == "triton" and not str(device).startswith("cuda") \
            and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"attention=triton needs a CUDA GPU (device is {device}; on the CPU only Triton's "
                          "interpreter runs it, TRITON_INTERPRET=1, at a snail's pace): set --attention=sdpa")
    if hparams.get("attention") == "triton" and precision == "bf16" and not str(device).startswith("cuda"):
        raise ConfigError(f"attention=triton in bf16 needs a CUDA GPU (device is {device}; Triton's interpreter "
                          "multiplies bf16 wrongly): set --precision=fp32 or --attention=sdpa")
    data_folder = Path(str(hparams["data_folder"]))
    if not data_folder.is_dir():
        raise ConfigError(f"data_folder={data_folder} does not exist: set --data_folder to the folder "
                          "that holds the audio (for LibriSpeech, the extracted LibriSpeech/)")
    if hparams.get("use_tensorboard"):
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("use_tensorboard=True needs the tensorboard package: pip install tensorboard, "
                              "or set --use_tensorboard=False") from None
    hang = hparams.get("hang_timeout_minutes")
    if isinstance(hang, bool) or not isinstance(hang, (int, float)) or hang < 0:
        raise ConfigError(f"hang_timeout_minutes={hang!r} is not a number of minutes >= 0: set "
                          "--hang_timeout_minutes=30 (0 turns the watchdog off)")
    check_sharded_backend(layerdrop)


def saved_config_text(path):
    """The resolved YAML that SpeechBrain saved in an output folder, without its header."""
    return "".join(line for line in Path(path).read_text().splitlines(True)
                   if not line.startswith(("# Generated", "# /", "# yamllint")))


def check_output_folder(output_folder, new_config, resume, overwrite):
    """Refuse to mix two configurations in one output folder.

    Returns "new", "same" (resume as usual), "resume" (asked, with another config)
    or "overwrite" (asked: the caller empties the folder first).
    """
    saved = Path(output_folder) / "hyperparams.yaml"
    if not saved.exists():
        return "new"
    if overwrite:  # asked: also with the same configuration, which would otherwise resume
        return "overwrite"
    old_lines = saved_config_text(saved).splitlines()
    new_lines = new_config.splitlines()
    if old_lines == new_lines:
        return "same"
    if resume:
        return "resume"
    changed = sorted({line[2:].split(":")[0].strip() for line in difflib.ndiff(old_lines, new_lines)
                      if line[:2] in ("- ", "+ ") and ":" in line})
    raise ConfigError(
        f"output_folder={output_folder} holds a run with another configuration (changed: "
        f"{', '.join(changed)}): pass --resume=True to continue it with the new values, "
        "--overwrite=True to delete it and start afresh, or choose another --output_folder"
    )
