"""Train a tiny probe (LLaVA-1.5, Qwen2.5-VL or InternVL3 architecture) on the generated probe suite (`prunebench/data/probe.py`), CPU or GPU.

    python scripts/train_probe.py --out runs/probe_llava [--seed 0] [--steps-a 300 --steps-b 800 --steps-c 800 --steps-d 800 --focus reading --lr-d 3e-4 --steps-e 1500 --lr-e 1e-3 --sup 1.0]
    python scripts/train_probe.py --family qwen2_5_vl    # the same recipe, Qwen2.5-VL architecture, runs/probe_qwen25vl
    python scripts/train_probe.py --family internvl      # the same recipe, InternVL3 architecture, runs/probe_internvl3

Staged recipe (the plateau breaker of issue 6 is dense supervision of the vision encoder):
  A. vision encoder alone on dense per-patch labels (object kind, colour, digit, background colour;
     object patches up-weighted), with a curriculum: at most 2 shapes per scene first, then up to 4;
  B. projector + language model on the questions, vision encoder frozen (the alignment stage: a
     random projector/LLM must not wreck the encoder's features with its first gradients);
  C. everything on the questions, the dense loss kept as an auxiliary term (weight --aux);
  D. (optional, --steps-d) as C, with 3/4 of each batch drawn from the --focus families;
  E. (--steps-e, 0 to skip) binding: every family in equal shares, fresh AdamW moments and fresh dense
     heads (with a cell-column head, for spatial), plus attention supervision read from the LLM's own
     (eager, training-only) attention at layers --sup-layer .. +2 (`supervision()`): each named word
     -> the image tokens of the objects it names; the answer position -> the named words; the answer
     position -> the right MCQ option's line. Stages A-D alone leave existence, attribute and spatial
     at chance: nothing carries the question's words to the image tokens they are about.
     `--jitter P` cuts a random part of the object-free image tokens of a share P of E's items at the LLM
     entry (contiguous positions; `jitter_drops()`), so no answer leans on the image block's length: the
     InternVL3 probe, whose one tile always gave 144 tokens, needs it (its card).
     `--init DIR` starts stage E from a saved stage-D checkpoint (an HF checkpoint directory) instead
     of training A-D again; the weights are the from-scratch run's, because E resets the moments and
     heads either way.
Data is a pure function of (seed, step), so a rerun with the same arguments resumes from the last
saved state (`<out>/state/`, safetensors) and reproduces the same run. Held-out accuracy per family
(first answer token, greedy) is logged every --eval-every steps on the `test` split; the blind floor
is the same measurement with zero visual tokens (the image placeholder removed from the prompt).
The final checkpoint (`<out>/final/`: safetensors, tokenizer, processor, README.md card) loads with
`LlavaForConditionalGeneration.from_pretrained` (`Qwen2_5_VLForConditionalGeneration` for --family qwen2_5_vl,
`InternVLForConditionalGeneration` for --family internvl; its processor through
`prunebench.families.processors.load_processor`, which needs no torchvision).
What differs between the families (model, processor, prompts, pixels, the features the dense heads
read) is in one object per family, `LlavaProbe` / `QwenProbe` / `InternVLProbe`; stages, losses, data,
state and evaluation are shared.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunebench.data import probe  # noqa: E402
from prunebench.fixtures import tiny, tiny_families, tiny_qwen  # noqa: E402

CLIP_MEAN = torch.tensor(tiny.OPENAI_CLIP_MEAN).view(3, 1, 1)
CLIP_STD = torch.tensor(tiny.OPENAI_CLIP_STD).view(3, 1, 1)
DENSE_HEADS = {"kind": len(probe.KINDS), "color": len(probe.COLORS), "digit": 11, "background": len(probe.COLORS)}
DENSE_HEADS_E = {**DENSE_HEADS, "col": probe.GRID}  # stage E adds the object's cell column (spatial)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="llava", help="the architecture to train")
    p.add_argument("--out", type=Path, default=None,
                   help="default runs/probe_llava, runs/probe_qwen25vl, runs/probe_internvl3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--patch-size", type=int, default=None,
                   help="ViT patch: default 8 (llava), 4 (qwen2_5_vl, internvl: with the 2x2 merge or pixel "
                        "shuffle, 144 tokens either way)")
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--text-hidden", type=int, default=128)
    p.add_argument("--steps-a", type=int, default=300, help="stage A: dense vision steps")
    p.add_argument("--steps-b", type=int, default=800, help="stage B: questions, vision frozen")
    p.add_argument("--steps-c", type=int, default=800, help="stage C: questions, everything trained")
    p.add_argument("--steps-d", type=int, default=800, help="stage D: like C, 3/4 of each batch from --focus")
    p.add_argument("--focus", default="reading",
                   help="stage D: the families to push after C (comma-separated)")
    p.add_argument("--lr-d", type=float, default=3e-4, help="stage D peak learning rate (below --lr: a restart at --lr undoes count)")
    p.add_argument("--steps-e", type=int, default=1500, help="stage E: binding, with attention supervision")
    p.add_argument("--lr-e", type=float, default=1e-3, help="stage E peak learning rate")
    p.add_argument("--sup", type=float, default=1.0, help="stage E: weight of the attention-supervision loss")
    p.add_argument("--sup-layer", type=int, default=0,
                   help="stage E: first of the three LLM layers whose attention is supervised (see supervision())")
    p.add_argument("--jitter", type=float, default=0.0,
                   help="stage E: share of items whose image block loses a random part of its object-free tokens "
                        "at the LLM entry (contiguous positions), so no answer can lean on the prompt's length "
                        "(see jitter_drops())")
    p.add_argument("--init", type=Path, default=None,
                   help="start stage E from this stage-D checkpoint directory instead of training A-D")
    p.add_argument("--batch-a", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--aux", type=float, default=0.3, help="weight of the dense loss in stage C")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-n", type=int, default=40, help="held-out questions per family per evaluation")
    p.add_argument("--final-eval-n", type=int, default=500, help="held-out questions per family at the end")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    family = FAMILIES[args.family]
    args.out = args.out if args.out is not None else Path(f"runs/{family.run_name}")
    args.patch_size = args.patch_size or family.patch_size
    return args


# ---------------------------------------------------------------------------- model and tokens


def tokenizer_corpus(family: str = "llava") -> list[str]:
    """Every probe question and answer, plus the family's chat scaffolding (so roles are whole tokens)."""
    corpus = probe.all_questions() + probe.all_answers()
    if family in ("qwen2_5_vl", "internvl"):  # the same <|im_start|>{role}\n scaffolding
        corpus += ["user", "assistant"] + [f"user\n{q}" for q in probe.all_questions()]
        return corpus + [f"assistant\n{a}" for a in probe.all_answers()]
    corpus += ["USER:", "ASSISTANT:"]
    corpus += [f"USER: \n{q} ASSISTANT:" for q in probe.all_questions()]
    return corpus + [f"ASSISTANT: {a}" for a in probe.all_answers()]


class LlavaProbe:
    """LLaVA-1.5: CLIP (patch 8 -> 12x12 patches), 2-layer projector, Llama; `<image>` -> 144 tokens."""

    name, run_name, patch_size = "llava", "probe_llava", 8
    image_token = tiny.IMAGE_TOKEN
    blind_cut = (0, 0)  # tokens removed before/after the image placeholder for the blind prompt
    blind_how = "the <image> placeholder removed"
    image_wrap: tuple[str, ...] = ()  # tokens the processor puts around the expanded image tokens
    answer_prefix = " "  # "ASSISTANT: 3"

    def __init__(self, processor) -> None:
        self.processor = processor

    @staticmethod
    def build(args: argparse.Namespace):
        tokenizer = tiny.build_tokenizer(tokenizer_corpus())
        config = tiny.build_config(
            tokenizer, image_size=args.image_size, patch_size=args.patch_size, vision_layers=args.vision_layers,
            vision_hidden=args.vision_hidden, vision_heads=4, text_layers=args.text_layers,
            text_hidden=args.text_hidden, text_heads=4, text_kv_heads=None, intermediate_mult=4)
        model = tiny.build_model(config, args.seed)
        processor = tiny.build_processor(args.image_size, args.patch_size, tokenizer)
        return model, processor

    @staticmethod
    def grid(args: argparse.Namespace) -> int:
        return args.image_size // args.patch_size

    def prompt_text(self, question: str) -> str:
        return tiny.llava15_prompt(question)

    def vision_inputs(self, images: list, ids: torch.Tensor, device) -> dict[str, torch.Tensor]:
        """The forward's image arguments for a batch (`ids`: its input_ids)."""
        return {"pixel_values": pixels(images).to(device)}

    def run_vision(self, model, images: list, device) -> None:
        """Stage A: the vision encoder alone (the tap catches the features)."""
        model.model.vision_tower(pixels(images).to(device))

    def encoder(self, model) -> nn.Module:
        """What stage B freezes."""
        return model.model.vision_tower

    def tap(self, model) -> FeatureTap:
        return FeatureTap(model)

    @staticmethod
    def tap_hidden(args: argparse.Namespace) -> int:
        return args.vision_hidden

    @classmethod
    def describe(cls, args: argparse.Namespace, n_params: int) -> str:
        return f"""A {n_params:,}-parameter model of the LLaVA-1.5 architecture
(`LlavaForConditionalGeneration`: CLIP {args.vision_layers}x{args.vision_hidden}, patch {args.patch_size},
{args.image_size} px -> {(args.image_size // args.patch_size) ** 2} visual tokens; 2-layer GELU projector;
Llama {args.text_layers}x{args.text_hidden})"""


class QwenProbe:
    """Qwen2.5-VL: ViT (patch 4 -> 24x24 patches, window attention) with the 2x2 merger (-> 12x12 = 144
    LLM tokens, the LLaVA probe's count), Qwen2 decoder with 3-D M-RoPE.

    Windows of 32 px are 8x8 patches, as the real model's 112 px at patch 14, and here one probe cell
    each; blocks 1 and 3 attend globally (the real model: every 8th, the last included). The dense heads
    read the merger output (`visual(...).pooler_output`: the 144 tokens the LLM gets, back in row-major
    order after the ViT's window permutation), so `probe.patch_labels(scene, 12)` lines up with them.
    """

    name, run_name, patch_size = "qwen2_5_vl", "probe_qwen25vl", 4
    image_token = tiny_qwen.IMAGE_PAD
    blind_cut = (1, 1)  # <|vision_start|> and <|vision_end|> go with the image: the text-only prompt
    blind_how = "the <|vision_start|><|image_pad|><|vision_end|> block removed: the text-only prompt"
    image_wrap: tuple[str, ...] = ()
    answer_prefix = ""  # "<|im_start|>assistant\n3"
    window_px, fullatt = 32, (1, 3)

    def __init__(self, processor) -> None:
        self.processor = processor
        self.image_id = processor.tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def build(cls, args: argparse.Namespace):
        tokenizer = tiny_qwen.build_qwen_tokenizer(tokenizer_corpus(cls.name))
        config = tiny_qwen.build_qwen2_5_vl_config(
            tokenizer, patch_size=args.patch_size, vision_depth=args.vision_layers, vision_hidden=args.vision_hidden,
            vision_heads=4, out_hidden=args.text_hidden, window_size=cls.window_px, fullatt_block_indexes=cls.fullatt,
            text_layers=args.text_layers, text_hidden=args.text_hidden, text_heads=4, text_kv_heads=4,
            intermediate_mult=4)
        model = tiny_qwen.build_qwen_model(tiny_qwen.MODEL_CLASSES[cls.name], config, args.seed)
        n = cls.grid(args) ** 2  # min = max tokens: a probe image stays at its size
        processor = tiny_qwen.build_qwen_processor(cls.name, patch_size=args.patch_size, min_tokens=n,
                                                   max_tokens=n, tokenizer=tokenizer)
        return model, processor

    @staticmethod
    def grid(args: argparse.Namespace) -> int:
        return args.image_size // (args.patch_size * tiny_qwen.MERGE_SIZE)

    def prompt_text(self, question: str) -> str:
        return tiny_qwen.qwen_vl_prompt(question)

    def pixels(self, images: list) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [B*576, 96] (patches grouped 2x2, as the merger reads them) and image_grid_thw [B, 3],
        from the processor's own image processor (fast enough here: ~3 ms an image)."""
        out = self.processor.image_processor(images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def vision_inputs(self, images: list, ids: torch.Tensor, device) -> dict[str, torch.Tensor]:
        px, thw = self.pixels(images)
        # text 0, image 1, as the processor's mm_token_type_ids: without them 2.5-VL silently uses 1-D positions
        return {"pixel_values": px.to(device), "image_grid_thw": thw.to(device),
                "mm_token_type_ids": (ids == self.image_id).long().to(device)}

    def run_vision(self, model, images: list, device) -> None:
        px, thw = self.pixels(images)
        model.model.visual(px.to(device), grid_thw=thw.to(device))

    def encoder(self, model) -> nn.Module:
        """The ViT without its merger: stage B trains the merger (the projector) with the LLM."""
        visual = model.model.visual
        return nn.ModuleList([visual.patch_embed, visual.blocks])

    def tap(self, model) -> MergedTap:
        return MergedTap(model)

    @staticmethod
    def tap_hidden(args: argparse.Namespace) -> int:
        return args.text_hidden

    @classmethod
    def describe(cls, args: argparse.Namespace, n_params: int) -> str:
        g = cls.grid(args)
        return f"""A {n_params:,}-parameter model of the Qwen2.5-VL architecture
(`Qwen2_5_VLForConditionalGeneration`: ViT {args.vision_layers}x{args.vision_hidden}, patch {args.patch_size},
windows of {cls.window_px} px with full attention in blocks {", ".join(map(str, cls.fullatt))},
{args.image_size} px -> {2 * g}x{2 * g} patches -> 2x2 merger -> {g * g} visual tokens;
Qwen2 {args.text_layers}x{args.text_hidden} with 3-D M-RoPE; the dense heads of the recipe read the merger
output, so "vision encoder" below means ViT + merger in stage A and the ViT alone in stage B)"""


class InternVLProbe:
    """InternVL3: InternViT (CLS + absolute positions, layer scale; patch 4 -> 24x24 patches), CLS dropped,
    2x2 pixel shuffle (downsample 0.5) -> 12x12 = 144 LLM tokens (the other probes' count), LayerNorm + MLP
    projector, Qwen2 decoder. The 96 px image is one tile (min = max tiles = 1: no dynamic tiling, no
    thumbnail). The processor expands the prompt's `<IMG_CONTEXT>` into `<img>` + 144 x `<IMG_CONTEXT>` +
    `</img>`. The dense heads read the projector output (the tokens the LLM gets; pixel shuffle keeps them
    in row-major order of the 12x12 grid), so `probe.patch_labels(scene, 12)` lines up with them.
    """

    name, run_name, patch_size = "internvl", "probe_internvl3", 4
    image_token = tiny_families.IMG_CONTEXT
    image_wrap = (tiny_families.IMG_START, tiny_families.IMG_END)
    blind_cut = (0, 1)  # the placeholder and the "\n" the chat template puts after it: the text-only prompt
    blind_how = "the <img><IMG_CONTEXT>...</img> block and its newline removed: the text-only prompt"
    answer_prefix = ""  # "<|im_start|>assistant\n3"

    def __init__(self, processor) -> None:
        self.processor = processor

    @classmethod
    def build(cls, args: argparse.Namespace):
        tokenizer = tiny_families.build_internvl_tokenizer(tokenizer_corpus(cls.name))
        vit = dict(hidden_size=args.vision_hidden, num_hidden_layers=args.vision_layers, num_attention_heads=4,
                   intermediate_size=4 * args.vision_hidden, image_size=args.image_size, patch_size=args.patch_size)
        eot = tokenizer.convert_tokens_to_ids(tiny_qwen.ENDOFTEXT)
        text = tiny_families.qwen2_text_config(
            dict(vocab_size=len(tokenizer), hidden_size=args.text_hidden, num_hidden_layers=args.text_layers,
                 num_attention_heads=4, num_key_value_heads=4, intermediate_size=4 * args.text_hidden,
                 max_position_embeddings=4096),
            dict(bos_token_id=eot, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        config = tiny_families.internvl_config(vit, text, image_token_id=tokenizer.context_image_token_id)
        model = tiny_qwen.build_qwen_model(tiny_families.InternVLForConditionalGeneration, config, args.seed)
        processor = tiny_families.build_internvl_processor(image_size=args.image_size, patch_size=args.patch_size,
                                                           max_tiles=1, tokenizer=tokenizer)
        return model, processor

    @staticmethod
    def grid(args: argparse.Namespace) -> int:
        return args.image_size // (args.patch_size * 2)  # 2x2 pixel shuffle

    def prompt_text(self, question: str) -> str:
        return tiny_families.internvl_prompt(question)

    def pixels(self, images: list) -> torch.Tensor:
        """pixel_values [B, 3, 96, 96] (one tile an image) from the processor's own image processor, with the
        tiling the processor turns on at call time."""
        return self.processor.image_processor(images, crop_to_patches=True, return_tensors="pt")["pixel_values"]

    def vision_inputs(self, images: list, ids: torch.Tensor, device) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels(images).to(device)}

    def run_vision(self, model, images: list, device) -> None:
        """Stage A: InternViT, pixel shuffle and projector (the tap catches the projector output)."""
        config = model.config
        model.model.get_image_features(self.pixels(images).to(device), vision_feature_layer=config.vision_feature_layer,
                                       vision_feature_select_strategy=config.vision_feature_select_strategy)

    def encoder(self, model) -> nn.Module:
        """InternViT without the projector: stage B trains the projector with the LLM."""
        return model.model.vision_tower

    def tap(self, model) -> ProjectorTap:
        return ProjectorTap(model.model.multi_modal_projector)

    @staticmethod
    def tap_hidden(args: argparse.Namespace) -> int:
        return args.text_hidden

    @classmethod
    def describe(cls, args: argparse.Namespace, n_params: int) -> str:
        g = cls.grid(args)
        return f"""A {n_params:,}-parameter model of the InternVL3 architecture
(`InternVLForConditionalGeneration`: InternViT {args.vision_layers}x{args.vision_hidden}, patch {args.patch_size},
{args.image_size} px as one tile (no dynamic tiling, no thumbnail) -> {2 * g}x{2 * g} patches, CLS dropped ->
2x2 pixel shuffle -> {g * g} visual tokens; LayerNorm + MLP projector; Qwen2 {args.text_layers}x{args.text_hidden};
the dense heads of the recipe read the projector output, so "vision encoder" below means InternViT + projector
in stage A and InternViT alone in stage B; without torchvision the processor loads through
`prunebench.families.processors.load_processor`, as `InternVLProcessor` needs a video processor)"""


FAMILIES = {"llava": LlavaProbe, "qwen2_5_vl": QwenProbe, "internvl": InternVLProbe}


def build(args: argparse.Namespace):
    """(model, processor) of args.family, seeded by args.seed."""
    return FAMILIES[args.family].build(args)


def probe_family(processor) -> LlavaProbe | QwenProbe | InternVLProbe:
    """The family object for a processor the script built (or saved and loaded back)."""
    if isinstance(processor, transformers.Qwen2_5_VLProcessor):
        return QwenProbe(processor)
    if isinstance(processor, transformers.InternVLProcessor):
        return InternVLProbe(processor)
    return LlavaProbe(processor)


class DenseHeads(nn.Module):
    """Per-patch linear classifiers on the features the projector sees (training only, not saved)."""

    def __init__(self, hidden: int, classes: dict[str, int] = DENSE_HEADS) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in classes.items()})

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.norm(feats)
        return {k: head(h) for k, head in self.heads.items()}


def pixels(images: list) -> torch.Tensor:
    """CLIP preprocessing of images already at the model size (resize/crop are then identities)."""
    arr = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images]))
    x = arr.permute(0, 3, 1, 2).float() / 255.0
    return (x - CLIP_MEAN) / CLIP_STD


class Prompts:
    """Token ids of prompts and answers, cached per string (the template set is small)."""

    def __init__(self, processor, n_image: int) -> None:
        self.family = probe_family(processor)
        self.tok = processor.tokenizer
        self.image_id = self.tok.convert_tokens_to_ids(self.family.image_token)
        wrap = [self.tok.convert_tokens_to_ids(t) for t in self.family.image_wrap]
        self.fill = wrap[:1] + [self.image_id] * n_image + wrap[1:]  # what the processor expands one placeholder to
        self.n_image = n_image
        self.cache: dict[tuple[str, bool], list[int]] = {}
        self.offsets: dict[str, list[tuple[int, int, int]]] = {}

    def prompt(self, question: str, blind: bool = False) -> list[int]:
        """The expanded prompt; blind: the image placeholder (and the family's markers around it) removed."""
        key = (question, blind)
        if key not in self.cache:
            ids = self.tok(self.family.prompt_text(question))["input_ids"]
            at = ids.index(self.image_id)
            before, after = self.family.blind_cut if blind else (0, 0)
            fill = [] if blind else self.fill
            self.cache[key] = ids[:at - before] + fill + ids[at + 1 + after:]
        return self.cache[key]

    def text_positions(self, text: str, lo: int, hi: int) -> list[int]:
        """Positions in the expanded prompt of the tokens of prompt text ``text`` overlapping text[lo:hi]."""
        if text not in self.offsets:
            enc = self.tok(text, return_offsets_mapping=True)
            at = enc["input_ids"].index(self.image_id)
            shift = len(self.fill) - 1
            self.offsets[text] = [(j + shift, a, b) for j, (a, b) in enumerate(enc["offset_mapping"]) if j > at]
        return [j for j, a, b in self.offsets[text] if a < hi and b > lo]

    def answer(self, answer: str) -> list[int]:
        ids = self.tok(self.family.answer_prefix + answer, add_special_tokens=False)["input_ids"]
        return ids + [self.tok.eos_token_id]


def batch_tensors(prompts: Prompts, qa: list[tuple[str, str]], blind: bool = False, with_answer: bool = True):
    """Right-padded input_ids, attention_mask, labels (-100 outside the answer), last prompt position."""
    seqs, labels, last = [], [], []
    for question, answer in qa:
        p = prompts.prompt(question, blind)
        a = prompts.answer(answer) if with_answer else []
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
        last.append(len(p) - 1)
    width = max(map(len, seqs))
    pad = prompts.tok.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    lab = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
    return ids, mask, lab, torch.tensor(last)


# ---------------------------------------------------------------------------------------- data


def train_items(seed: int, step: int, n: int, max_count: int | None = None, focus: list[str] | None = None):
    """(family, scene, question, answer) for the step's batch; a pure function of (seed, step)."""
    out = []
    for j in range(n):
        index = step * n + j
        if focus and j % 4:  # stage D: three in four items from the focus families
            family, scene, q, a = probe.make_scene_qa(index, seed=seed, split="train-focus", families=focus)
        else:
            family, scene, q, a = probe.make_scene_qa(index, seed=seed, split="train")
        if max_count is not None and family not in ("spatial", "reading"):  # curriculum: fewer shapes
            scene = probe.random_scene(random.Random(f"curriculum:{seed}:{index}"), max_count=max_count)
            family, q, a = "dense-only", "", ""
        out.append((family, scene, q, a))
    return out


def stage_e_items(seed: int, step: int, n: int):
    """Stage E's batch: every family in equal shares (round-robin), items of their own split."""
    return [probe.make_scene_qa(step * n + j, seed=seed, split="train-e") for j in range(n)]


def dense_targets(scenes: list, grid: int) -> dict[str, torch.Tensor]:
    labels = [probe.patch_labels(s, grid) for s in scenes]
    col = [(i % grid) * probe.GRID // grid for i in range(grid * grid)]  # the patch's cell column
    return {k: torch.tensor([lab[k] for lab in labels]) for k in DENSE_HEADS} | {"col": torch.tensor([col] * len(scenes))}


def dense_loss(heads: DenseHeads, feats: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy per patch, object patches x4 (they are the minority and carry the detail)."""
    logits = heads(feats)
    targets = {k: targets[k] for k in logits}
    weight = 1.0 + 3.0 * (targets["kind"] > 0).float()
    total = feats.new_zeros(())
    for k, y in targets.items():
        ce = nn.functional.cross_entropy(logits[k].flatten(0, 1), y.flatten().to(feats.device), reduction="none")
        total = total + (ce * weight.flatten().to(feats.device)).sum() / weight.sum()
    return total


class FeatureTap:
    """Captures the output of the vision layer whose features the projector reads (layer -2)."""

    def __init__(self, model) -> None:
        layer = model.model.vision_tower.encoder.layers[model.config.vision_feature_layer]
        self.feats: torch.Tensor | None = None
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        out = output[0] if isinstance(output, tuple) else output
        self.feats = out[:, 1:]  # drop CLS, as the "default" feature strategy does


class MergedTap:
    """Qwen2.5-VL: captures the merger output the LLM receives, [B, 144, hidden] in row-major token order
    (the vision tower undoes its window permutation after the merger)."""

    def __init__(self, model) -> None:
        self.feats: torch.Tensor | None = None
        self.handle = model.model.visual.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        grid_thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        n = int(grid_thw[0].prod()) // module.spatial_merge_unit  # tokens per image (all images the same size)
        merged = output.pooler_output
        self.feats = merged.view(-1, n, merged.shape[-1])


class ProjectorTap:
    """InternVL: captures the projector output the LLM receives, [B, 144, hidden] (after the pixel shuffle)."""

    def __init__(self, projector: nn.Module) -> None:
        self.feats: torch.Tensor | None = None
        self.handle = projector.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.feats = output


# ------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, prompts: Prompts, n_per_family: int, device, blind: bool = False, bs: int = 64,
             seed: int = 0) -> dict[str, float]:
    """Held-out first-token accuracy per family (test split, the same items as dataset=probe)."""
    model.eval()
    n = n_per_family * len(probe.FAMILIES)
    hits: dict[str, list[bool]] = {f: [] for f in probe.FAMILIES}
    for start in range(0, n, bs):
        items = [probe.make_scene_qa(i, seed=seed, split="test") for i in range(start, min(n, start + bs))]
        ids, mask, _, last = batch_tensors(prompts, [(q, a) for _, _, q, a in items], blind, with_answer=False)
        kwargs = {} if blind else prompts.family.vision_inputs([probe.render(s) for _, s, _, _ in items], ids, device)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits
        pred = logits[torch.arange(len(items)), last.to(device)].argmax(-1).cpu()
        for (family, _, _, answer), p in zip(items, pred, strict=True):
            hits[family].append(int(p) == prompts.answer(answer)[0])
    model.train()
    return {f: 100.0 * sum(h) / len(h) for f, h in hits.items()}


# ------------------------------------------------------------------------------------ state files


def save_state(out: Path, step: int, model, heads, opt, log: list[dict]) -> None:
    """Model, heads and AdamW moments as safetensors (no pickle), step and log as JSON; atomic."""
    state = out / "state"
    tmp = out / "state.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    save_file(heads.state_dict(), tmp / "heads.safetensors")
    moments = {}
    for i, p in enumerate(opt.param_groups[0]["params"]):
        st = opt.state.get(p)
        if st:
            moments[f"{i}.exp_avg"], moments[f"{i}.exp_avg_sq"] = st["exp_avg"], st["exp_avg_sq"]
            moments[f"{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(1)
    save_file(moments, tmp / "adam.safetensors")
    (tmp / "progress.json").write_text(json.dumps({"step": step, "log": log}, indent=1))
    if state.exists():
        for f in state.iterdir():
            f.unlink()
        state.rmdir()
    tmp.rename(state)


def load_state(out: Path, model, heads, opt) -> tuple[int, list[dict]]:
    state = out / "state"
    if not (state / "progress.json").is_file():
        return 0, []
    model.load_state_dict(load_file(state / "model.safetensors"))
    heads.load_state_dict(load_file(state / "heads.safetensors"))
    moments = load_file(state / "adam.safetensors")
    for i, p in enumerate(opt.param_groups[0]["params"]):
        if f"{i}.exp_avg" in moments:
            opt.state[p] = {"exp_avg": moments[f"{i}.exp_avg"], "exp_avg_sq": moments[f"{i}.exp_avg_sq"],
                            "step": moments[f"{i}.step"].reshape(()).float()}
    progress = json.loads((state / "progress.json").read_text())
    return int(progress["step"]), list(progress["log"])


# -------------------------------------------------------------------------------------- training


STAGES = "ABCDE"


def bounds(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """[first, last) step of each stage."""
    out, lo = {}, 0
    for stage in STAGES:
        hi = lo + getattr(args, f"steps_{stage.lower()}")
        out[stage], lo = (lo, hi), hi
    return out


def stage_of(step: int, args: argparse.Namespace) -> str:
    return next((st for st, (lo, hi) in bounds(args).items() if lo <= step < hi), STAGES[-1])


def total_steps(args: argparse.Namespace) -> int:
    return bounds(args)["E"][1]


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Per stage: 50-step linear warm-up, cosine decay to 10 %."""
    stage = stage_of(step, args)
    lo, hi = bounds(args)[stage]
    t, span = step - lo, max(1, hi - lo)
    warm = min(1.0, (t + 1) / 50)
    peak = {"D": args.lr_d, "E": args.lr_e}.get(stage) or args.lr
    return peak * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / span)))


# ------------------------------------------------------------------------- stage E: attention supervision

_NAMED = {
    "existence": re.compile(r"Is there a (\w+) (\w+) in"),
    "attribute": re.compile(r"What color is the (\w+)\?"),
    "spatial": re.compile(r"Is the (\w+) to the left or to the right of the (\w+)\?"),
}


def _cell_patches(obj: probe.Obj, grid: int) -> list[int]:
    per = grid // probe.GRID
    return [(obj.row * per + r) * grid + obj.col * per + c for r in range(per) for c in range(per)]


def supervision(prompts: Prompts, family: str, scene: probe.Scene, question: str, answer: str,
                grid: int) -> list[tuple[int, int, int | None, list[int]]]:
    """The attention targets of one item: (layer offset, head, query position or None = answer position, keys).

    The circuit taught (offsets from --sup-layer):
      +0  at each named word: shape word -> the image tokens of every object of that shape; existence's
          colour word -> those of every object of that colour;
      +1  at the answer position: head 0 -> the (first) shape word, head 1 -> the second shape word
          (spatial) or the colour word (existence);
      +2  at the answer position (attribute): head 0 -> the line of the right MCQ option.
    count, reading and background are left to themselves (A-D taught them).
    """
    if family not in _NAMED:
        return []
    text = prompts.family.prompt_text(question)
    m = _NAMED[family].search(text)
    image_at = prompts.prompt(question).index(prompts.image_id)

    def patches(pred) -> list[int]:
        return [image_at + i for o in scene.objects if pred(o) for i in _cell_patches(o, grid)]

    def word(g: int) -> list[int]:
        return prompts.text_positions(text, *m.span(g))

    out: list[tuple[int, int, int | None, list[int]]] = []
    if family == "existence":
        color, kind = m.groups()
        shape_at, color_at = word(2), word(1)
        out += [(0, 0, q, patches(lambda o: o.kind == kind)) for q in shape_at]
        out += [(0, 0, q, patches(lambda o: o.color == color)) for q in color_at]
        out += [(1, 0, None, shape_at), (1, 1, None, color_at)]
    elif family == "attribute":
        kind = m.group(1)
        out += [(0, 0, q, patches(lambda o: o.kind == kind)) for q in word(1)]
        out.append((1, 0, None, word(1)))
        lo = text.index(f"\n{answer}. ") + 1
        hi = text.find("\n", lo)
        out.append((2, 0, None, prompts.text_positions(text, lo, len(text) if hi < 0 else hi)))
    else:  # spatial
        a, b = m.groups()
        out += [(0, 0, q, patches(lambda o: o.kind == a)) for q in word(1)]
        out += [(0, 0, q, patches(lambda o: o.kind == b)) for q in word(2)]
        out += [(1, 0, None, word(1)), (1, 1, None, word(2))]
    return [t for t in out if t[3]]  # a "no" colour may name no object in the scene


class AttentionTap:
    """Attention probabilities of the supervised LLM layers, as the (eager) attention returns them in stage E."""

    def __init__(self, model, layer: int, span: int = 3) -> None:
        layers = model.model.language_model.layers
        self.first = layer
        self.probs: dict[int, torch.Tensor] = {}
        self.handles = [layers[i].self_attn.register_forward_hook(self._hook(i))
                        for i in range(layer, min(layer + span, len(layers)))]

    def _hook(self, i: int):
        def hook(module, args, output) -> None:
            self.probs[i] = output[1]
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def attention_loss(tap: AttentionTap, prompts: Prompts, items, last: torch.Tensor, grid: int,
                   moved: torch.Tensor | None = None) -> torch.Tensor:
    """-log of the attention mass each supervised head puts on its targets (mean over targets and items);
    moved [B, W]: each position's row in the sequence the LLM saw (`Compact`), when the image blocks were cut."""
    terms = []
    for b, (family, scene, question, answer) in enumerate(items):
        for offset, head, query, keys in supervision(prompts, family, scene, question, answer, grid):
            if moved is not None:  # the targets are named objects' tokens and words: never cut
                query, keys = None if query is None else int(moved[b, query]), moved[b, keys].tolist()
            row = int(last[b]) if query is None else query
            terms.append(-torch.log(tap.probs[tap.first + offset][b, head, row, keys].sum() + 1e-6))
    return torch.stack(terms).mean() if terms else last.new_zeros((), dtype=torch.float32)


# --------------------------------------------------------------------------- stage E: length jitter


def empty_tokens(scene: probe.Scene, grid: int) -> list[int]:
    """The image tokens (row-major on the grid x grid board) of the cells that hold no object (kind "none")."""
    return [i for i, kind in enumerate(probe.patch_labels(scene, grid)["kind"]) if kind == 0]


def jitter_drops(seed: int, step: int, items, grid: int, share: float) -> list[list[int]]:
    """Per item, the image tokens the LLM will not see: with probability ``share`` a random number (>= 1) of
    the tokens of empty cells, at most all but one cell's worth (16 of 144, keep 0.111); else none.

    Why: a one-tile probe always sees the same image-block length, and the InternVL3 probe learned to tell
    image prompts from text-only ones by it, so pruning with contiguous positions (a shorter block) moved
    even its background answers. Real InternVL3 sees 256 to 3,328 tokens an image (dynamic tiling). Only
    object-free tokens go, so every answer stays in the image: the jitter teaches that length carries
    nothing, not how to answer from a partial image. One cue it adds: an object keeps its cell's 16 tokens,
    so a block of fewer than 16 n tokens never holds n objects (a shorter block allows fewer). A floor of 64
    (4 objects) would remove that cue but leaves blocks under 64 unseen, and a 200-step trial with it kept
    less of the background under random_pre at keep 0.111 (91 vs 94 of 100). Shifting the position ids
    alone, all 144 tokens kept, did not help (29). A pure function of (seed, step, item).
    """
    out = []
    floor = grid * grid // probe.GRID ** 2  # one cell
    for j, (_, scene, _, _) in enumerate(items):
        rng = random.Random(f"jitter:{seed}:{step}:{j}")
        empty = empty_tokens(scene, grid)
        most = min(len(empty), grid * grid - floor)
        out.append(sorted(rng.sample(empty, rng.randint(1, most))) if rng.random() < share and most > 0 else [])
    return out


class Compact:
    """Cuts rows of each sequence at the LLM entry (a pre-hook on the language model): the LLM then sees
    shorter sequences with contiguous positions, as under pre-LLM pruning; rows are cut per item.

    index [B, W']: the rows kept, in order, right-padded; mask [B, W']: the new attention mask;
    moved [B, W]: each old row's new row (-1: cut)."""

    def __init__(self, mask: torch.Tensor, cut: list[list[int]]) -> None:
        rows = []
        self.moved = torch.full(mask.shape, -1, dtype=torch.long)
        for b, drop in enumerate(cut):
            gone = set(drop)
            kept = [p for p in range(int(mask[b].sum())) if p not in gone]
            self.moved[b, kept] = torch.arange(len(kept))
            rows.append(kept)
        width = max(map(len, rows))
        self.index = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows])
        self.mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        self.handle = None

    def labels(self, lab: torch.Tensor) -> torch.Tensor:
        return lab.gather(1, self.index).masked_fill(self.mask == 0, -100)

    def last(self, last: torch.Tensor) -> torch.Tensor:
        return self.moved.gather(1, last[:, None])[:, 0]

    def install(self, model) -> Compact:
        self.handle = model.model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def remove(self) -> None:
        self.handle.remove()

    def _hook(self, module, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        if kwargs.get("position_ids") is not None:
            raise RuntimeError("Compact expects the LLM to number positions itself")
        index = self.index.to(embeds.device)
        kwargs["inputs_embeds"] = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
        kwargs["attention_mask"] = self.mask.to(embeds.device)
        return args, kwargs


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over labelled positions (what the HF models' `loss` computes)."""
    return nn.functional.cross_entropy(logits.float()[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device),
                                       ignore_index=-100)


def begin_stage_e(args, model, opt, device) -> DenseHeads:
    """Fresh AdamW moments and dense heads (seeded), eager attention in the LLM (to read its probabilities)."""
    opt.state.clear()
    torch.manual_seed(args.seed + 5)
    heads = DenseHeads(FAMILIES[args.family].tap_hidden(args), DENSE_HEADS_E).to(device)
    opt.param_groups[0]["params"] = list(model.parameters()) + list(heads.parameters())
    model.model.language_model.set_attn_implementation("eager")
    return heads


def train_step(step: int, args, model, heads, tap, prompts, opt, device, grid: int,
               attn: AttentionTap | None = None) -> dict[str, float]:
    stage = stage_of(step, args)
    family = prompts.family
    for group in opt.param_groups:
        group["lr"] = lr_at(step, args) * group.get("scale", 1.0)
    if stage == "A":
        ramp = 2 if step < args.steps_a // 2 else None  # curriculum: two shapes at most, first half
        items = train_items(args.seed, step, args.batch_a, max_count=ramp or probe.MAX_COUNT)
        family.run_vision(model, [probe.render(s) for _, s, _, _ in items], device)
        loss = dense_loss(heads, tap.feats, dense_targets([s for _, s, _, _ in items], grid))
        parts = {"dense": loss.item()}
    else:
        focus = [f for f in args.focus.split(",") if f] if stage == "D" else None
        items = (stage_e_items(args.seed, step, args.batch) if stage == "E"
                 else train_items(args.seed, step, args.batch, focus=focus))
        ids, mask, lab, last = batch_tensors(prompts, [(q, a) for _, _, q, a in items])
        vision = family.vision_inputs([probe.render(s) for _, s, _, _ in items], ids, device)
        family.encoder(model).requires_grad_(stage != "B")
        cut = None
        if stage == "E" and args.jitter > 0:
            starts = [prompts.prompt(q).index(prompts.image_id) for _, _, q, _ in items]
            drops = jitter_drops(args.seed, step, items, grid, args.jitter)
            cut = Compact(mask, [[at + i for i in d] for at, d in zip(starts, drops, strict=True)]).install(model)
        try:
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                        labels=None if cut else lab.to(device), **vision)
        finally:
            if cut is not None:
                cut.remove()
        loss = out.loss if cut is None else causal_lm_loss(out.logits, cut.labels(lab))
        parts = {"qa": loss.item()}
        if stage != "B" and args.aux > 0:
            aux = dense_loss(heads, tap.feats, dense_targets([s for _, s, _, _ in items], grid))
            loss, parts["dense"] = loss + args.aux * aux, aux.item()
        if stage == "E" and args.sup > 0:
            last_seen, moved = (last, None) if cut is None else (cut.last(last), cut.moved)
            sup = attention_loss(attn, prompts, items, last_seen.to(device), grid, moved)
            loss, parts["attn"] = loss + args.sup * sup, sup.item()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    return parts


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, processor = build(args)
    model.to(device).train()
    family = FAMILIES[args.family]
    heads = DenseHeads(family.tap_hidden(args)).to(device)
    grid = family.grid(args)
    prompts = Prompts(processor, grid * grid)
    opt = torch.optim.AdamW([{"params": list(model.parameters()) + list(heads.parameters())}],
                            lr=args.lr, weight_decay=0.0)
    if args.steps_e and not 0 <= args.sup_layer <= args.text_layers - 3:
        raise SystemExit(f"stage E supervises LLM layers --sup-layer .. +2: need 0 <= --sup-layer <= "
                         f"{args.text_layers - 3} with {args.text_layers} text layers (got {args.sup_layer})")
    if not 0.0 <= args.jitter <= 1.0:
        raise SystemExit(f"--jitter is a share of stage E's items: 0 to 1 (got {args.jitter})")
    if args.jitter and args.family == "qwen2_5_vl":
        raise SystemExit("--jitter: families llava, internvl (the Qwen2.5-VL LLM gets M-RoPE position ids from the "
                         "model, which a cut would have to renumber; pruning keeps them anyway)")
    args.out.mkdir(parents=True, exist_ok=True)
    e_start = bounds(args)["E"][0]
    saved = args.out / "state" / "progress.json"
    saved_step = json.loads(saved.read_text())["step"] if saved.is_file() else 0
    e_ready = bool(args.steps_e) and saved_step > e_start  # a state saved at e_start is D's last
    if e_ready:  # resuming inside stage E: E's heads and attention before its saved state
        heads = begin_stage_e(args, model, opt, device)
    step, log = load_state(args.out, model, heads, opt)
    if step == 0 and args.init is not None:  # stage E from a saved stage-D checkpoint
        if not args.steps_e:
            raise SystemExit("--init starts stage E: give --steps-e > 0")
        model.load_state_dict(type(model).from_pretrained(args.init).state_dict())  # HF key mapping, safetensors
        step = e_start
        print(f"[train_probe] stage-D weights from {args.init}, starting stage E at step {step}", flush=True)
    tap = prompts.family.tap(model)
    attn = AttentionTap(model, args.sup_layer) if args.steps_e else None
    total = total_steps(args)
    wall0 = time.time() - sum(e.get("seconds", 0.0) for e in log[-1:])
    print(f"[train_probe] {sum(p.numel() for p in model.parameters()):,} params, device {device}, "
          f"resuming at step {step}/{total}", flush=True)
    t_last = time.time()
    while step < total:
        if step == e_start and not e_ready:
            heads, e_ready = begin_stage_e(args, model, opt, device), True
        parts = train_step(step, args, model, heads, tap, prompts, opt, device, grid, attn)
        step += 1
        if step % 20 == 0:
            rate = 20 / (time.time() - t_last)
            t_last = time.time()
            print(f"step {step}/{total} stage {stage_of(step - 1, args)} lr {lr_at(step - 1, args):.2e} "
                  + " ".join(f"{k} {v:.3f}" for k, v in parts.items()) + f" ({rate:.2f} it/s)", flush=True)
        evaluate_now = step % args.eval_every == 0 and step > args.steps_a
        if evaluate_now:
            acc = evaluate(model, prompts, args.eval_n, device)
            print(f"[eval] step {step} " + " ".join(f"{f} {a:.1f}" for f, a in acc.items()), flush=True)
            log.append({"step": step, "seconds": time.time() - wall0, "accuracy": acc})
        if step % args.save_every == 0 or step == total or evaluate_now:
            if not log or log[-1]["step"] != step:
                log.append({"step": step, "seconds": time.time() - wall0})
            save_state(args.out, step, model, heads, opt, log)
    tap.handle.remove()
    if attn is not None:
        attn.remove()
        model.model.language_model.set_attn_implementation("sdpa")  # the checkpoint runs as it ships
    finish(args, model, processor, prompts, device, log)
    return 0


MARGIN = 25.0  # points above the blind floor for a family to be kept in the default suite
TARGET = 90.0  # issue 6's bar for a kept family


def finish(args, model, processor, prompts, device, log: list[dict]) -> None:
    """Final held-out accuracy and blind floor; the HF checkpoint, blind_floor.json and the card in <out>/final."""
    acc = evaluate(model, prompts, args.final_eval_n, device)
    blind = evaluate(model, prompts, args.final_eval_n, device, blind=True)
    print("[final] " + " ".join(f"{f} {acc[f]:.1f} (blind {blind[f]:.1f})" for f in probe.FAMILIES), flush=True)
    final = args.out / "final"
    final.mkdir(parents=True, exist_ok=True)
    model.eval().to("cpu")
    model.save_pretrained(final, safe_serialization=True)
    processor.save_pretrained(final)
    kept = [f for f in probe.FAMILIES if acc[f] >= TARGET and acc[f] - blind[f] >= MARGIN]
    floor = {"dataset": {"kind": "probe", "seed": 0, "image_size": args.image_size}, "metrics": blind,
             "how": f"zero visual tokens ({FAMILIES[args.family].blind_how}), greedy first answer token, "
                    f"first {args.final_eval_n} items per family of the test split",
             "vanilla_first_token": acc, "kept": kept}
    (final / "blind_floor.json").write_text(json.dumps(floor, indent=1) + "\n")
    (final / "README.md").write_text(card(args, model, acc, blind, kept, log, device), encoding="utf-8")
    print(f"[train_probe] wrote {final}", flush=True)


def verdict(acc: float, blind: float) -> str:
    if acc - blind < MARGIN:
        return "DROPPED (not taught)"
    return "kept" if acc >= TARGET else f"DROPPED (learned, below {TARGET:.0f})"


def d_recipe(args) -> str:
    out = ""
    if args.steps_d:
        out += f"; D) {args.steps_d} steps as C with 3/4 of each batch from {args.focus}, peak lr {args.lr_d or args.lr}"
    if args.steps_e:
        out += (f"; E) {args.steps_e} steps on every family in equal shares, fresh AdamW moments and dense heads "
                f"(plus a cell-column head), peak lr {args.lr_e}, attention supervision (weight {args.sup}) at "
                f"LLM layers {args.sup_layer}-{args.sup_layer + 2}: named word -> the image tokens of what it "
                f"names, answer position -> the named words, then -> the right MCQ option (`supervision()`)")
        if args.jitter:
            out += (f"; length jitter on {args.jitter:.0%} of E's items: a random part of the image tokens of "
                    f"empty cells cut at the LLM entry, contiguous positions (`jitter_drops()`)")
    return out


def card(args, model, acc: dict[str, float], blind: dict[str, float], kept: list[str], log: list[dict],
         device) -> str:
    wall = log[-1]["seconds"] if log else 0.0
    steps = total_steps(args)
    family = FAMILIES[args.family]
    command = (f"python scripts/train_probe.py{'' if family.name == 'llava' else ' --family ' + family.name} "
               f"--out {args.out} --seed {args.seed} --steps-a {args.steps_a} "
               f"--steps-b {args.steps_b} --steps-c {args.steps_c}"
               + (f" --steps-d {args.steps_d} --focus {args.focus} --lr-d {args.lr_d or args.lr}"
                  if args.steps_d else "")
               + (f" --steps-e {args.steps_e} --lr-e {args.lr_e} --sup {args.sup} --sup-layer {args.sup_layer}"
                  + (f" --jitter {args.jitter}" if args.jitter else "")
                  if args.steps_e else " --steps-e 0"))  # stage E is on by default
    init = ("" if args.init is None else
            f"; this run added `--init {args.init}`: stage E started from that stage-D checkpoint (E resets the "
            f"moments and heads, so the weights are the full run's; the wall time below is E's alone)")
    rows = "\n".join(
        f"| {f} | {acc[f]:.1f} | {blind[f]:.1f} | {acc[f] - blind[f]:+.1f} | "
        f"{verdict(acc[f], blind[f])} |"
        for f in probe.FAMILIES)
    curve = "\n".join(f"| {e['step']} | {e['seconds'] / 60:.1f} | "
                       + " | ".join(f"{e['accuracy'][f]:.0f}" for f in probe.FAMILIES) + " |"
                       for e in log if "accuracy" in e)
    dropped = [f for f in probe.FAMILIES if f not in kept]
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [prunebench, {family.name}, probe, synthetic]
---
# prunebench {family.run_name.replace("_", "-")} (trained)

{family.describe(args, sum(p.numel() for p in model.parameters()))}, trained from scratch by prunebench on its generated probe
suite (`prunebench/data/probe.py`, `dataset=probe`). Loads with `from_pretrained` (safetensors, no
remote code). Nothing was downloaded.

- command: `{command}` (deterministic given the seed; resumes from `<out>/state/`{init})
- seed {args.seed}, {steps} steps, device {device} ({torch.get_num_threads()} thread(s), shared CPU), wall time {wall / 60:.1f} min
- recipe: A) {args.steps_a} steps of the vision encoder alone on dense per-patch labels (object kind,
  colour, digit, background; object patches x4), batch {args.batch_a}, at most two shapes per scene in
  the first half (curriculum); B) {args.steps_b} steps of projector + LLM on the questions, encoder frozen,
  batch {args.batch}; C) {args.steps_c} steps of everything on the questions with the dense loss as an
  auxiliary term (weight {args.aux}){d_recipe(args)}. AdamW, lr {args.lr}, per-stage 50-step warm-up and cosine to 10 %.

## Held-out accuracy per family (test split, first {args.final_eval_n} items per family)

Greedy first answer token (the answers are one token). Blind floor: the same model and questions
with zero visual tokens. A family is kept in the default suite when it is >= {MARGIN:.0f} points above
its blind floor and at >= {TARGET:.0f} % (issue 6's bars).

| family | vanilla | blind floor | margin | default suite |
|---|---|---|---|---|
{rows}

Dropped from the default suite: {", ".join(dropped) if dropped else "none"}.

## Learning curve (held-out, {args.eval_n} per family)

| step | minutes | {" | ".join(probe.FAMILIES)} |
|---|---|{"---|" * len(probe.FAMILIES)}
{curve}

<!-- pruning:start -->
<!-- pruning:end -->
"""


if __name__ == "__main__":
    sys.exit(main())
