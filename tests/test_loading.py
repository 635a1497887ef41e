"""Loading: clear errors for anything that is not a supported decoder-only RoPE model."""

import pytest
from transformers import DeepseekV3Config, GPT2Config

from relay_llm.engine import RelayEngine
from relay_llm.loading import UnsupportedModelError, load


def test_unknown_model_names_the_supported_families():
    with pytest.raises(UnsupportedModelError, match="Llama, Mistral, Qwen2, Qwen3, Gemma 3"):
        load("/no/such/model")


def test_corrupt_gguf_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(UnsupportedModelError, match="GGUF"):
        load(str(bad))


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"123")
    with pytest.raises(UnsupportedModelError, match="not a .gguf"):
        load(str(f))


def test_corrupt_weights_in_hf_folder(tiny_dirs, tmp_path):
    import shutil

    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_dirs["llama"], folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(UnsupportedModelError, match="cannot load"):
        load(str(folder))


@pytest.mark.parametrize("config, match", [
    (GPT2Config(n_layer=1, n_embd=32, n_head=2), "unsupported architecture 'gpt2'"),
    (DeepseekV3Config(num_hidden_layers=1, hidden_size=32, num_attention_heads=2), "MLA"),
])
def test_unsupported_architectures(tmp_path, config, match):
    config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=match):
        RelayEngine.load(str(tmp_path))


def test_fingerprint_tracks_dtype(tiny_dirs):
    _, _, fp32, _ = load(str(tiny_dirs["qwen2"]), dtype="float32")
    _, _, bf16, _ = load(str(tiny_dirs["qwen2"]), dtype="bfloat16")
    assert fp32.weights == bf16.weights and fp32.key() != bf16.key()


def test_unknown_dtype(tiny_dirs):
    with pytest.raises(ValueError, match="unknown dtype"):
        load(str(tiny_dirs["qwen2"]), dtype="int3")
