"""Checks that run before the first training step and turn a misconfiguration
into one line that names the key or flag to change.

Each check raises `ConfigError`; `train.py` prints its message and exits with
status 2, so no traceback and no half-started run reaches the user.
"""

import logging
import os

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


def pop_find_unused_parameters(argv):
    """Remove `--find_unused_parameters[=X]` from `argv` and return (value, rest).

    SpeechBrain's parser knows the flag only as a switch, so `=False` would be
    rejected there; the value is None when the user did not give the flag.
    """
    value, rest = None, []
    for arg in argv:
        name, _, text = arg.partition("=")
        if name == "--find_unused_parameters":
            value = parse_bool("find_unused_parameters", text if text else True)
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
        if requested is False:
            raise ConfigError(
                f"layerdrop={wavlm.layerdrop} skips encoder layers, whose parameters then get "
                "no gradient, which DDP refuses: set --find_unused_parameters=True "
                "(or leave it unset), or --layerdrop=0.0"
            )
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
