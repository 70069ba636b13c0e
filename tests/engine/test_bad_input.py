"""Errors a user can cause name the problem and leave the engine usable."""

import json
import shutil

import pytest

from engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(checkpoints):
    return LLM(checkpoints["llama"], max_model_len=64)


def test_empty_prompt(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]], SamplingParams(max_tokens=4))


def test_prompt_longer_than_context_window(llm):
    with pytest.raises(ValueError, match="context window allows at most 63"):
        llm.generate([list(range(2, 66))], SamplingParams(max_tokens=4))


def test_token_ids_outside_vocabulary(llm):
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 384\)"):
        llm.generate([[5, 384]], SamplingParams(max_tokens=4))


@pytest.mark.parametrize("max_tokens", [0, -3])
def test_max_tokens_must_be_positive(max_tokens):
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        SamplingParams(max_tokens=max_tokens)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("temperature", -1.0, "temperature must be a finite number >= 0"),
        ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
        ("top_k", -5, "top_k must be -1, 0"),
    ],
)
def test_bad_sampling_params(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_a_bad_request_in_a_batch_loses_nothing(llm):
    with pytest.raises(ValueError):
        llm.generate([[5, 6, 7], []], SamplingParams(max_tokens=4))
    bm = llm.engine.block_manager
    assert not llm.engine.has_unfinished() and bm.num_free_blocks == bm.num_blocks
    assert len(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4))[0].token_ids) >= 1


def test_missing_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        LLM(tmp_path)


def test_unsupported_architecture(tmp_path, checkpoints):
    model = tmp_path / "gpt2ish"
    shutil.copytree(checkpoints["llama"], model)
    config = json.loads((model / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"):
        LLM(model)


def test_bad_dtype(checkpoints):
    with pytest.raises(ValueError, match="dtype must be one of .*'float32'.*got 'float64'"):
        LLM(checkpoints["llama"], dtype="float64")


def test_cuda_without_gpu(checkpoints):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="CUDA is not available"):
        LLM(checkpoints["llama"], device="cuda")


def test_weights_that_do_not_match_the_config(tmp_path, checkpoints):
    model = tmp_path / "mismatch"
    shutil.copytree(checkpoints["llama"], model)
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] = 96
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has shape .* config.json implies"):
        LLM(model)
