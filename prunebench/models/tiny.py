"""Build a tiny, randomly initialised LLaVA-1.5-architecture checkpoint entirely offline.

The checkpoint has the exact module structure of ``llava-hf/llava-1.5-*-hf`` (CLIP vision tower,
2-layer GELU projector, Llama language model, ``<image>`` placeholder expanded by ``LlavaProcessor``)
but tiny sizes and untrained weights, so pipelines and pruning methods can be exercised on CPU.
Everything is deterministic: the same arguments give byte-identical files.

Notes on transformers 5.23:
- ``CLIPImageProcessor`` is the torchvision-backed class; the PIL-backed one is ``CLIPImageProcessorPil``.
  We build with the PIL class so nothing needs torchvision. ``save_pretrained`` strips the ``Pil``
  suffix (``image_processor_type: CLIPImageProcessor``) and ``AutoProcessor`` picks the backend at load
  time: torchvision if installed, else PIL (force it with ``AutoProcessor.from_pretrained(p, backend="pil")``).
- The processor chat template is saved as ``chat_template.jinja``; the tokenizer is saved as the generic
  ``TokenizersBackend`` (v5's ``PreTrainedTokenizerFast``), whose ``tokenizer.json`` carries the BOS
  post-processor.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from prunebench.data.shapes import all_answers, all_questions, templates_corpus

IMAGE_TOKEN = "<image>"
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
BPE_VOCAB_SIZE = 512  # upper bound; the template corpus saturates at ~400 tokens

# The llava-hf/llava-1.5-*-hf chat template: "USER: <image>\n{question} ASSISTANT:".
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}"
    "{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}"
    "{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def llava15_prompt(question: str) -> str:
    """The LLaVA-1.5 single-image prompt string for ``question``."""
    return f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


# ------------------------------------------------------------------------------------------ tokenizer


def tokenizer_corpus() -> list[str]:
    """Deterministic training corpus: dataset templates plus the LLaVA-1.5 chat scaffolding."""
    corpus = templates_corpus() + ["USER:", "ASSISTANT:"]
    corpus += [f"USER: \n{q} ASSISTANT:" for q in all_questions()]
    corpus += [f"ASSISTANT: {a}" for a in all_answers()]
    return corpus


def build_tokenizer(corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``corpus`` (default :func:`tokenizer_corpus`); ``<image>``/``<pad>``
    appended like llava-hf."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus if corpus is not None else tokenizer_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.add_special_tokens({"pad_token": PAD})
    return tokenizer


# --------------------------------------------------------------------------------- config and model


def build_processor(
    image_size: int, patch_size: int, tokenizer: PreTrainedTokenizerFast | None = None
) -> LlavaProcessor:
    """A LLaVA-1.5 processor built locally: CLIP preprocessing, the BPE tokenizer, the chat template."""
    return LlavaProcessor(
        image_processor=build_image_processor(image_size),
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_15_CHAT_TEMPLATE,
    )


def build_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """CLIP preprocessing (resize shortest edge, centre crop, CLIP mean/std), PIL backend."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )


def build_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    image_size: int,
    patch_size: int,
    vision_layers: int,
    vision_hidden: int,
    vision_heads: int,
    text_layers: int,
    text_hidden: int,
    text_heads: int,
    text_kv_heads: int | None,
    intermediate_mult: int,
) -> LlavaConfig:
    """A ``LlavaConfig`` with the LLaVA-1.5 structure and the given (small) sizes."""
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * intermediate_mult,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
        hidden_act="quick_gelu",
    )
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=text_hidden * intermediate_mult,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads or text_heads,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        **ids,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(image_size // patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["LlavaForConditionalGeneration"],
        dtype="float32",
    )


def build_model(config: LlavaConfig, seed: int) -> LlavaForConditionalGeneration:
    """Randomly initialised model; the global torch RNG is seeded and restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.eval()
    text = config.text_config
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (
        text.bos_token_id,
        text.eos_token_id,
        text.pad_token_id,
    )
    return model


# ------------------------------------------------------------------------- full-size reference configs

ARCH_DIR = Path(__file__).with_name("arch")
_LLAVA15_TEXT = {  # Vicuna-v1.5 sizes from the llava-hf model cards
    "7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
    },
    "13b": {
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
    },
}


def llava15_reference_config(variant: str) -> LlavaConfig:
    """The ``LlavaConfig`` of ``llava-hf/llava-1.5-{variant}-hf`` (``variant`` in ``7b``/``13b``)."""
    sizes = _LLAVA15_TEXT[variant]
    text = LlamaConfig(
        **sizes,
        num_key_value_heads=sizes["num_attention_heads"],
        vocab_size=32064,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        dtype="float16",
    )
    vision = CLIPVisionConfig(  # CLIP ViT-L/14-336
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=32000,
        image_seq_length=576,
        pad_token_id=32001,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        architectures=["LlavaForConditionalGeneration"],
        dtype="float16",
    )


def write_configs(configs: dict[str, Callable[[], Any]], arch_dir: str | Path = ARCH_DIR) -> list[Path]:
    """(Re)write ``arch_dir/<name>.json`` from each ``name -> () -> config`` (shipped for weights=random)."""
    arch_dir = Path(arch_dir)
    arch_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in configs.items():
        path = arch_dir / f"{name}.json"
        path.write_text(make().to_json_string(), encoding="utf-8")
        paths.append(path)
    return paths


def write_reference_configs(arch_dir: str | Path = ARCH_DIR) -> list[Path]:
    """(Re)write ``arch/llava-1.5-{7b,13b}.json`` from :func:`llava15_reference_config`."""
    return write_configs({f"llava-1.5-{v}": (lambda v=v: llava15_reference_config(v)) for v in _LLAVA15_TEXT},
                         arch_dir)


# ---------------------------------------------------------------------------------------- saving


def _model_card(seed: int, sizes: dict[str, int | None], num_params: int) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in sizes.items())
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [prunebench, llava, random-weights, testing]
---
# prunebench tiny-llava (random weights)

Built locally by `prunebench.models.tiny.build_tiny_llava` — nothing was downloaded.

**The weights are untrained random initialisation (seed {seed}). Any accuracy measured with this
model is noise.** It exists to exercise LLaVA-1.5 pipelines (`LlavaForConditionalGeneration`,
`LlavaProcessor`, prompt `USER: <image>\\n{{question}} ASSISTANT:`) and visual-token pruning on CPU.

- parameters: {num_params:,}
- tokenizer: byte-level BPE trained on the prunebench shapes-dataset templates
- image processor: `CLIPImageProcessorPil` (no torchvision needed)

| setting | value |
|---|---|
| seed | {seed} |
{rows}
"""


def _save(path: Path, model, processor, card: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    (path / "README.md").write_text(card, encoding="utf-8")


def verify_tiny_llava(path: str | Path) -> None:
    """Load ``path`` back with ``from_pretrained``; check image-token expansion and a forward pass."""
    from PIL import Image

    path = Path(path)
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    vision = model.config.vision_config
    expected = (vision.image_size // vision.patch_size) ** 2
    image = Image.new("RGB", (vision.image_size, vision.image_size), (128, 64, 32))
    inputs = processor(
        images=image, text=llava15_prompt("What color is the background?"), return_tensors="pt"
    )
    got = int((inputs["input_ids"] == model.config.image_token_id).sum())
    if got != expected:
        raise RuntimeError(f"processor expanded <image> into {got} tokens, expected {expected}")
    with torch.no_grad():
        logits = model(**inputs).logits
    if logits.shape != (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size):
        raise RuntimeError(f"unexpected logits shape {tuple(logits.shape)}")


def build_tiny_llava(
    path: str | Path,
    *,
    seed: int = 0,
    image_size: int = 96,
    patch_size: int = 8,
    vision_layers: int = 8,
    vision_hidden: int = 128,
    vision_heads: int = 4,
    text_layers: int = 4,
    text_hidden: int = 192,
    text_heads: int = 4,
    text_kv_heads: int | None = None,
    intermediate_mult: int = 4,
) -> Path:
    """Build, save (safetensors + tokenizer + processor + README) and verify a tiny LLaVA at ``path``."""
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    path = Path(path)
    sizes = dict(
        image_size=image_size, patch_size=patch_size, vision_layers=vision_layers,
        vision_hidden=vision_hidden, vision_heads=vision_heads, text_layers=text_layers,
        text_hidden=text_hidden, text_heads=text_heads, text_kv_heads=text_kv_heads,
        intermediate_mult=intermediate_mult,
    )  # fmt: skip
    tokenizer = build_tokenizer()
    model = build_model(build_config(tokenizer, **sizes), seed)
    processor = build_processor(image_size, patch_size, tokenizer)
    num_params = sum(p.numel() for p in model.parameters())
    _save(path, model, processor, _model_card(seed, sizes, num_params))
    verify_tiny_llava(path)
    return path


def ensure_built(path: str | Path, build: Callable[..., Path], **kwargs: Any) -> Path:
    """Run ``build(tmp, **kwargs)`` unless ``path/config.json`` exists; atomic via temp dir + rename,
    so an interrupted build never leaves a half-written checkpoint."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists, is not empty and has no config.json; refusing to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
    try:
        build(tmp, **kwargs)
        tmp.chmod(0o755)  # mkdtemp creates 0700
        if path.exists():
            path.rmdir()  # empty directory: rename() cannot replace it portably
        os.rename(tmp, path)
    except OSError:
        if not (path / "config.json").is_file():  # lost a race to a concurrent builder: fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure_tiny_llava(path: str | Path, **kwargs: Any) -> Path:
    """Build the tiny LLaVA at ``path`` unless ``path/config.json`` exists (see `ensure_built`)."""
    return ensure_built(path, build_tiny_llava, **kwargs)
