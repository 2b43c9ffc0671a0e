"""The checks that run before step 1: each fires with a one-line message naming the fix."""

import pytest

from wavlm_ddp.preflight import (
    REDUCTION_ERROR,
    ConfigError,
    check_sharded_backend,
    explain_reduction_error,
    pop_bool_flag,
    resolve_find_unused_parameters,
)
from wavlm_wrapper import SpeechEncoder


@pytest.fixture(scope="module")
def with_layerdrop(tiny_wavlm_dir):
    return SpeechEncoder(str(tiny_wavlm_dir), layerdrop=0.5)


@pytest.fixture(scope="module")
def without_layerdrop(tiny_wavlm_dir):
    return SpeechEncoder(str(tiny_wavlm_dir), layerdrop=0.0)


@pytest.mark.parametrize(
    "argv,value,rest",
    [
        (["a.yaml", "--find_unused_parameters=False", "--x=1"], False, ["a.yaml", "--x=1"]),
        (["a.yaml", "--find_unused_parameters=true"], True, ["a.yaml"]),
        (["a.yaml", "--find_unused_parameters"], True, ["a.yaml"]),
        (["a.yaml", "--layerdrop=0.1"], None, ["a.yaml", "--layerdrop=0.1"]),
    ],
)
def test_find_unused_parameters_is_read_as_a_boolean_flag(argv, value, rest):
    assert pop_bool_flag(argv, "find_unused_parameters") == (value, rest)


def test_a_non_boolean_find_unused_parameters_names_the_flag():
    with pytest.raises(ConfigError, match="--find_unused_parameters=maybe is not a boolean"):
        pop_bool_flag(["--find_unused_parameters=maybe"], "find_unused_parameters")


def test_layerdrop_under_ddp_turns_find_unused_parameters_on_when_unset(with_layerdrop, caplog):
    caplog.set_level("INFO")
    assert resolve_find_unused_parameters(None, True, with_layerdrop) is True
    assert "find_unused_parameters=True set automatically" in caplog.text


def test_layerdrop_under_ddp_with_find_unused_parameters_false_is_refused(with_layerdrop):
    with pytest.raises(ConfigError) as error:
        resolve_find_unused_parameters(False, True, with_layerdrop)
    message = str(error.value)
    assert "\n" not in message
    assert "--find_unused_parameters=True" in message and "--layerdrop=0.0" in message


def test_find_unused_parameters_without_layerdrop_is_called_unnecessary(without_layerdrop, caplog):
    caplog.set_level("INFO")
    assert resolve_find_unused_parameters(True, True, without_layerdrop) is True
    assert "unnecessary" in caplog.text and "--find_unused_parameters=False" in caplog.text
    assert resolve_find_unused_parameters(None, True, without_layerdrop) is False


def test_single_process_keeps_the_users_value(with_layerdrop):
    assert resolve_find_unused_parameters(None, False, with_layerdrop) is False
    assert resolve_find_unused_parameters(False, False, with_layerdrop) is False


@pytest.mark.parametrize("flag,name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_fsdp_or_deepspeed_with_layerdrop_is_refused(flag, name):
    with pytest.raises(ConfigError, match=f"{name} detected: HF runs every layer there"):
        check_sharded_backend(0.1, env={flag: "true"})
    assert check_sharded_backend(0.0, env={flag: "true"}) == [name]
    assert check_sharded_backend(0.1, env={}) == []


def test_the_ddp_reduction_error_is_explained_in_one_line():
    original = RuntimeError(f"{REDUCTION_ERROR} before starting a new one. This error ...")
    explained = explain_reduction_error(original)
    assert isinstance(explained, ConfigError) and "--find_unused_parameters=True" in str(explained)
    other = RuntimeError("something else")
    assert explain_reduction_error(other) is other
