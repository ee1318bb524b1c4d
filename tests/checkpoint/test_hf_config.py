"""Hugging Face config fields that change the maths and are not implemented stop the conversion, named."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megakv.checkpoint.convert import main as convert_main
from megakv.checkpoint.hf_config import model_config_from_hf

CONVERT_TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"

# (model_type, fields changed in config.json, the words the error must hold).
REFUSED = {
    "activation": ("llama", {"hidden_act": "gelu_new"}, "hidden_act='gelu_new'"),
    "rope_type": ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
                  "rope_parameters.rope_type='dynamic'"),
    "rope_key": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4,
                                               "low_freq_factor": 1.0}}, "rope_parameters.low_freq_factor=1.0"),
    "partial_rotary": ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    "quantization": ("llama", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config="),
    "unknown_field": ("llama", {"qk_layernorm": True}, "qk_layernorm=True"),
    "llama_window": ("llama", {"sliding_window": 16}, "sliding_window=16"),
    "qwen2_partial_window": ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
                             "use_sliding_window=True"),
    "mixed_layers": ("mistral", {"sliding_window": 16, "layer_types": ["full_attention", "sliding_attention"]},
                     "layer_types="),
    "model_type": ("gemma", {}, "model_type 'gemma'"),
}


@pytest.fixture(scope="session")
def hf_folders(make_hf, tmp_path_factory):
    """model_type -> a small random HF model of that type (the base every refused config is edited from)."""
    root = tmp_path_factory.mktemp("hf-config")
    return {model_type: make_hf(root / model_type, model_type, "gqa") for model_type in ("llama", "mistral", "qwen2")}


def edited_copy(hf_folders: dict[str, Path], model_type: str, fields: dict, folder: Path) -> Path:
    shutil.copytree(hf_folders["llama" if model_type == "gemma" else model_type], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(fields, model_type=model_type)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("case", REFUSED)
def test_hf_config_conversion_refuses_unsupported_field(case, hf_folders, tmp_path, capsys):
    model_type, fields, words = REFUSED[case]
    source = edited_copy(hf_folders, model_type, fields, tmp_path / "hf")
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--source", "hf", "--input", str(source), "--output", str(tmp_path / "out"), "--tp", "1"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert_checkpoint: error: "), lines
    assert words in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [source]


def test_hf_config_cli_refusal_is_one_line(hf_folders, tmp_path):
    source = edited_copy(hf_folders, "llama", {"hidden_act": "xielu"}, tmp_path / "hf")
    proc = subprocess.run([sys.executable, str(CONVERT_TOOL), "--source", "hf", "--input", str(source), "--output",
                           str(tmp_path / "out"), "--tp", "1"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"convert_checkpoint: error: {source / 'config.json'}: unsupported field hidden_act='xielu': megakv "
        f"serves silu, gelu, gelu_pytorch_tanh, relu"]


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_hf_config_saved_by_transformers_reads_whole(model_type, hf_folders):
    """Every field transformers writes for these models is either read or known to leave inference unchanged."""
    config = json.loads((hf_folders[model_type] / "config.json").read_text())
    model = model_config_from_hf(config)
    assert model.qkv_bias == (model_type == "qwen2") and not model.proj_bias and not model.mlp_bias
    # Mistral's default window (4096) covers all 1024 positions of the test model: no window to apply.
    assert model.sliding_window is None


def test_hf_config_generation_eos_replaces_config_eos(hf_folders):
    config = {**json.loads((hf_folders["llama"] / "config.json").read_text()), "eos_token_id": 2}
    assert model_config_from_hf(config).eos_token_ids == (2,)
    assert model_config_from_hf(config, {"eos_token_id": [2, 200]}).eos_token_ids == (2, 200)
    assert model_config_from_hf(config, {"do_sample": True}).eos_token_ids == (2,)
    with pytest.raises(ValueError, match=r"generation_config.json eos_token_id must be .* got \[2, 'x'\]"):
        model_config_from_hf(config, {"eos_token_id": [2, "x"]})
