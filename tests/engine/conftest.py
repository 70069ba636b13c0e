import pytest

from tests.checkpoints import make_checkpoint, make_tokenizer

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 500000.0,
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer_dir):
    """One tiny checkpoint per supported family, each exercising that family's quirks."""
    root = tmp_path_factory.mktemp("ckpt")
    return {
        # Llama 3: GQA, llama3 rope scaling, untied LM head.
        "llama": make_checkpoint(root / "llama", "llama", tokenizer_dir, rope_parameters=LLAMA3_ROPE),
        # Qwen2: q/k/v biases, tied embeddings.
        "qwen2": make_checkpoint(root / "qwen2", "qwen2", tokenizer_dir, seed=1, tie_word_embeddings=True),
        # Mistral: a sliding window shorter than the prompts in the tests.
        "mistral": make_checkpoint(root / "mistral", "mistral", tokenizer_dir, seed=2, sliding_window=24),
    }
