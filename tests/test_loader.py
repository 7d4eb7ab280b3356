"""Model loading: pretrained from a local directory, random weights from a shipped architecture,
one-line errors when weights are missing."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from prunebench.errors import UserError
from prunebench.models import loader


def test_pretrained_from_local_directory(tiny_path):
    loaded = loader.load_model({"name": "t", "path": str(tiny_path)}, torch.device("cpu"))
    assert loaded.weights == "pretrained" and loaded.source == str(tiny_path)
    assert loaded.seams.n_vision_patches == 36 and len(loaded.seams.vision_layers) == 5
    assert loaded.accuracy_meaningful  # nothing says this checkpoint is untrained
    untrained = loader.load_model({"name": "t", "path": str(tiny_path), "untrained": True}, torch.device("cpu"))
    assert not untrained.accuracy_meaningful


def test_random_weights_build_the_shipped_architecture(tmp_path, monkeypatch, fam):
    # A small stand-in for prunebench/models/arch/*.json (the family's tiny config), read through
    # the same code path: config -> random weights -> a processor built locally, ids consistent.
    config = json.loads((fam.path / "config.json").read_text())
    (tmp_path / "small.json").write_text(json.dumps(config))
    monkeypatch.setattr(loader, "ARCH_DIR", tmp_path)
    loaded = loader.load_model({"name": "r", "family": fam.family, "weights": "random", "arch": "small"},
                               torch.device("cpu"))
    assert loaded.weights == "random" and not loaded.accuracy_meaningful
    assert type(loaded.model) is type(fam.model)
    processor = loaded.processor
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    prompt = processor.apply_chat_template(conv, add_generation_prompt=True)
    inputs = processor(images=Image.new("RGB", (fam.image_side, fam.image_side)), text=prompt, return_tensors="pt")
    ids = torch.tensor(loaded.seams.image_token_ids)
    assert int(torch.isin(inputs["input_ids"], ids).sum()) > 0
    with torch.no_grad():
        out = loaded.model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


@pytest.mark.parametrize(("arch", "layers", "tokens"), [("llava-1.5-7b", 32, 576), ("llava-1.5-13b", 40, 576)])
def test_shipped_real_size_architectures_construct(arch, layers, tokens):
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from prunebench.families.llava import llava_seams

    config = AutoConfig.for_model(**json.loads((loader.ARCH_DIR / f"{arch}.json").read_text()))
    with torch.device("meta"):
        model = LlavaForConditionalGeneration._from_config(config)
    seams = llava_seams(model)
    assert (len(seams.decoder_layers), seams.n_vision_patches, len(seams.vision_layers)) == (layers, tokens, 23)


def test_missing_weights_is_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="no weights for model 'x'.*model.path=.*model.weights=random"):
        loader.load_model({"name": "x", "path": str(tmp_path / "absent")}, torch.device("cpu"))


def test_a_pretrained_run_never_imports_the_fixtures(tiny_path):
    """Loading a checkpoint (no `build:`) imports the family's room only: no tiny builder, no test processor."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from prunebench.models.loader import load_model\n"
            f"load_model({{'name': 'x', 'family': 'llava', 'path': {str(tiny_path)!r}}}, torch.device('cpu'))\n"
            "print(sorted(m for m in sys.modules if m.startswith('prunebench.fixtures')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
