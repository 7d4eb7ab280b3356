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


def _random_build(tmp_path, monkeypatch, fam, **model):
    config = json.loads((fam.path / "config.json").read_text())
    (tmp_path / "small.json").write_text(json.dumps(config))
    monkeypatch.setattr(loader, "ARCH_DIR", tmp_path)
    return loader.load_model({"name": "r", "family": fam.family, "weights": "random", "arch": "small", **model},
                             torch.device("cpu"))


def test_the_tiled_init_keeps_transformers_layout_and_each_initialisers_scale(tmp_path, monkeypatch, fam):
    """Every tensor transformers sets to a constant (norm ones, zero biases, buffers) is that constant; every
    random one has the mean and spread of transformers' own draw; the same seed builds the same weights."""
    full = _random_build(tmp_path, monkeypatch, fam, random_init="full").model.state_dict()
    tiled = _random_build(tmp_path, monkeypatch, fam).model.state_dict()
    again = _random_build(tmp_path, monkeypatch, fam).model.state_dict()
    other = _random_build(tmp_path, monkeypatch, fam, init_seed=1).model.state_dict()
    assert full.keys() == tiled.keys()
    randoms = 0
    for name, ref in full.items():
        got = tiled[name]
        assert torch.equal(got, again[name]), name
        if not ref.is_floating_point() or ref.numel() < 2 or bool((ref == ref.flatten()[0]).all()):
            assert torch.equal(got, ref), name  # integers, scalars and constants: exactly transformers' values
            continue
        if ref.numel() < 256:
            continue  # too few draws to compare a spread
        randoms += 1
        assert not bool((got == got.flatten()[0]).all()), name
        assert abs(float(got.std()) / float(ref.std()) - 1) < 0.2, name
        assert abs(float(got.mean()) - float(ref.mean())) < 0.2 * float(ref.std()) + 1e-6, name
    assert randoms > 5
    assert any(not torch.equal(other[k], tiled[k]) for k in tiled)


def test_tiled_fills_repeat_the_pool_from_an_offset_and_the_patches_come_off():
    from transformers import initialization as hf_init

    from prunebench.models import tiled_init as ti

    before = (torch.nn.init.normal_, torch.nn.init.kaiming_uniform_, dict(hf_init.TORCH_INIT_FUNCTIONS))
    with ti.tiled_init(0):
        assert torch.nn.init.normal_ is not before[0]
        big = torch.nn.init.normal_(torch.empty(3, ti.POOL), mean=0.5, std=0.02)
        wide = torch.nn.init.kaiming_uniform_(torch.empty(64, 4096), a=5 ** 0.5)
    assert (torch.nn.init.normal_, torch.nn.init.kaiming_uniform_, hf_init.TORCH_INIT_FUNCTIONS) == before
    flat = big.flatten()
    assert torch.equal(flat[: ti.POOL], flat[ti.POOL: 2 * ti.POOL])  # the pool, repeated
    assert abs(float(big.mean()) - 0.5) < 1e-3 and abs(float(big.std()) - 0.02) < 1e-3
    bound = 1 / 4096 ** 0.5  # kaiming_uniform_ with a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as nn.Linear
    assert float(wide.abs().max()) <= bound and float(wide.abs().max()) > 0.99 * bound
    assert len({tuple(row[:8].tolist()) for row in wide}) == 64  # no row repeats another


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


# ---------------------------------------------------------------- processed inputs, once per model

def _counting_loaded(tiny, limit: int = 1 << 30):
    """A LoadedModel over the tiny checkpoint whose processor counts its calls."""
    from prunebench.models.loader import InputCache, LoadedModel

    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, *args, **kwargs):
            calls.append(1)
            return self.inner(*args, **kwargs)

    loaded = LoadedModel("tiny", tiny.model, Counting(tiny.processor), tiny.seams, torch.device("cpu"),
                         torch.float32, "pretrained", "test", True, inputs=InputCache(limit))
    return loaded, calls


def _shapes(n: int = 3):
    from prunebench.data.datasets import build_dataset

    return build_dataset({"kind": "shapes", "name": "shapes", "n": n, "image_size": 48}).items()


def test_a_batch_of_items_is_processed_once_and_each_call_gets_its_own_mapping(tiny):
    from prunebench.generation import _processed, batch_inputs

    loaded, calls = _counting_loaded(tiny)
    items = _shapes()
    first = batch_inputs(loaded, [items[0]])
    first["pixel_values"] = first["pixel_values"].half()  # what generation does to its copy
    again = batch_inputs(loaded, [items[0]])
    pair = batch_inputs(loaded, items[:2])
    assert len(calls) == 2 and loaded.inputs.hits == 1  # one single, one batch of two
    fresh = _processed(loaded, [items[0]])
    assert again.keys() == fresh.keys() and again["pixel_values"].dtype == torch.float32
    for key in fresh:
        assert torch.equal(again[key], fresh[key]), key
    assert pair["input_ids"].shape[0] == 2


def test_an_input_changed_in_place_is_processed_again(tiny):
    from prunebench.generation import batch_inputs

    loaded, calls = _counting_loaded(tiny)
    item = _shapes(1)[0]
    original = batch_inputs(loaded, [item])["pixel_values"].clone()
    batch_inputs(loaded, [item])["pixel_values"].zero_()  # a caller that writes into the tensors it was given
    assert torch.equal(batch_inputs(loaded, [item])["pixel_values"], original)
    assert len(calls) == 2 and loaded.inputs.bytes > 0


def test_a_full_cache_keeps_what_it_has_and_processes_the_rest_each_time(tiny):
    from prunebench.generation import batch_inputs

    one, _ = _counting_loaded(tiny)
    items = _shapes()
    batch_inputs(one, [items[0]])
    loaded, calls = _counting_loaded(tiny, limit=one.inputs.bytes)  # room for exactly one sample
    for _ in range(3):
        for item in items:
            batch_inputs(loaded, [item])
    assert len(calls) == 1 + 2 * 3  # the first sample stays; the two others are processed on every pass
    assert loaded.inputs.bytes == one.inputs.bytes
