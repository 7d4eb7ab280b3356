"""Batched inference (issue 14): B left-padded prompts per forward give every sample what it gets alone.

Per family and registered method that batches: greedy tokens at batch 4 equal batch 1, the step logits agree
within a tolerance (padded matmuls and masked SDPA round differently), and each row's kept counts are exactly its
own. Prompts differ in length (left padding) and images differ in content; on dynamic-resolution families they
differ in size too, so the rows hold different numbers of visual tokens and keep round(keep * N_i) each.
"""

from __future__ import annotations

import pytest
import torch
from test_contract import GEN, PRUNING, supported

from prunebench.errors import UserError
from prunebench.methods import METHODS, Stage, resolve_method
from prunebench.stages import batch_refusal, install

QUESTIONS = ["What color is the background? Answer with one word.",
             "Which shape is shown?",
             "Is there a red object in the picture? Answer yes or no, please, with one short word.",
             "Count the shapes."]
BATCHING = [n for n in PRUNING if batch_refusal(resolve_method(n)) is None]
# Logits of a row computed alone and inside a padded batch: same math, different reduction order.
ATOL = 1e-4


def _sizes(fam) -> list[tuple[int, int]]:
    """Image (width, height) per sample: every family but LLaVA-1.5 (one fixed grid) gets sizes that give
    different visual-token counts (Qwen: resolution; InternVL tiles, NeXT / OneVision any-res: aspect ratio)."""
    side = fam.image_side
    if fam.family in ("qwen2_5_vl", "qwen2_vl", "qwen3_vl"):  # one LLM token per 28 px (Qwen3-VL: 32 px)
        step = 32 if fam.family == "qwen3_vl" else 28
        return [(s, s) for s in (side, side - step, side, side + step)]
    if fam.family == "llava":
        return [(side, side)] * len(QUESTIONS)
    return [(side, side), (2 * side, side), (side, side), (3 * side, side)]


def samples(fam) -> list[dict]:
    from prunebench.data.shapes import make_sample

    out = []
    for i, (question, size) in enumerate(zip(QUESTIONS, _sizes(fam), strict=True)):
        image = make_sample(i, image_size=fam.image_side).image.resize(size)
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        out.append({"text": fam.processor.apply_chat_template(conv, add_generation_prompt=True), "images": image})
    return out


def single(fam, sample: dict):
    return fam.processor(text=sample["text"], images=sample["images"], return_tensors="pt")


def batch(fam, items: list[dict]):
    return fam.processor(text=[s["text"] for s in items], images=[s["images"] for s in items],
                         return_tensors="pt", padding=True, padding_side="left")


def greedy(fam, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = fam.model.generate(**inputs, **GEN, output_logits=True, return_dict_in_generate=True)
    width = inputs["input_ids"].shape[1]
    return out.sequences[:, width:], torch.stack(out.logits, 1)


SEEDS = [11, 12, 13, 14]


def run_alone_and_batched(fam, method, keep: float):
    items = samples(fam)
    alone = []
    with install(fam.seams, method, keep=keep, seed=0) as inst:
        for seed, sample in zip(SEEDS, items, strict=True):
            inst.reseed(seed)
            tokens, logits = greedy(fam, single(fam, sample))
            alone.append((tokens[0], logits[0], inst.counts))
        inst.reseed_rows(SEEDS)
        tokens, logits = greedy(fam, batch(fam, items))
        rows = list(inst.state.row_counts)
    return alone, (tokens, logits, rows)


def assert_same(alone, batched) -> None:
    tokens, logits, rows = batched
    assert len(rows) == len(alone)
    for b, (one_tokens, one_logits, one_counts) in enumerate(alone):
        assert rows[b] == one_counts, f"row {b}"
        torch.testing.assert_close(logits[b], one_logits, atol=ATOL, rtol=0, msg=f"row {b}")
        assert torch.equal(tokens[b], one_tokens), f"row {b}"


def test_vanilla_batch_equals_alone(fam):
    alone, batched = run_alone_and_batched(fam, resolve_method("vanilla"), 1.0)
    assert_same(alone, batched)
    if fam.family != "llava":  # the rows really hold different visual-token counts
        assert len({c.n_visual_in for _, _, c in alone}) > 1


@pytest.mark.parametrize("name", BATCHING)
def test_batch_of_four_equals_each_alone(fam, name):
    method = resolve_method(name)
    if not supported(fam, name) or (method.stage is Stage.VISION and fam.family == "llava_onevision"):
        # OneVision's vision-stage merges take videos only (tests/test_video.py)
        pytest.skip(f"{name} does not run on {fam.family} (contract: refused or its own test)")
    try:
        alone, batched = run_alone_and_batched(fam, method, 0.25)
    except UserError as err:  # multi-layer intra-LLM stages need equal visual counts per row: refused in one line
        assert METHODS.get(name).intra is not None and "different visual-token counts" in str(err)
        assert len({c.n_visual_in for _, _, c in batched_counts_alone(fam, method)}) > 1
        return
    assert_same(alone, batched)


def batched_counts_alone(fam, method):
    with install(fam.seams, method, keep=0.25, seed=0) as inst:
        out = []
        for sample in samples(fam):
            greedy(fam, single(fam, sample))
            out.append((None, None, inst.counts))
    return out


@pytest.mark.parametrize("name", sorted(set(PRUNING) - set(BATCHING)) + ["compose"])
def test_methods_that_cannot_batch_say_why(name):
    reason = batch_refusal(resolve_method(name) if name != "compose" else resolve_method(
        "compose", {"stages": [{"method": "random_pre"}, {"method": "fastv"}]}))
    assert reason and "\n" not in reason
    assert METHODS.get(name).stage is Stage.PIPELINE or name in reason


def test_runner_batches_give_the_rows_of_batch_one(tiny_path, tmp_path):
    """`batch_size=3` over 4 samples (a batch of 3, then 1): the same predictions and per-sample counts as
    batch 1; the record states the batch size, sums each batch's time once, and gives throughput."""
    from test_runner import config, lines

    from prunebench import runner
    from prunebench.record import load_record

    rows, records = {}, {}
    for size in (1, 3):
        path = runner.run(config(tiny_path, tmp_path, "method=random_pre", "keep=0.25", f"batch_size={size}"),
                          quiet=True)
        records[size], rows[size] = load_record(path), lines(path.parent / "predictions.jsonl")
    same = ("prediction", "n_visual_in", "n_visual_out", "n_new_tokens", "prompt_len", "llm_prompt_len", "flops")
    for one, three in zip(rows[1], rows[3], strict=True):
        assert {k: one[k] for k in same} == {k: three[k] for k in same}
    assert [r["batch_size"] for r in rows[3]] == [3, 3, 3, 1]
    assert [r.get("batch_of") for r in rows[3]] == [0, 0, 0, None]
    rec = records[3]
    assert rec.batch_size == 3 and records[1].batch_size == 1
    assert rec.timing["n_batches"] == 2 and rec.timing["n_timed"] == 4
    totals = {r.get("batch_of", r["index"]): r["timing"]["total_s"] for r in rows[3]}
    assert rec.timing["total_s"] == pytest.approx(sum(totals.values()))
    assert rec.timing["samples_per_s"] == pytest.approx(4 / rec.timing["total_s"])
    assert rec.tokens == records[1].tokens
    # a sample's KV bytes: its share of the batch's cache, which holds the longest row's length
    assert rows[3][0]["kv_layer_bytes_prefill"][0] >= rows[1][0]["kv_layer_bytes_prefill"][0]


def test_runner_refuses_a_method_that_cannot_batch(tiny_path, tmp_path):
    from test_runner import config

    from prunebench import runner

    with pytest.raises(UserError, match=r"^batch_size=2: sparsevlm rates .* use batch_size=1$"):
        runner.Job.from_config(config(tiny_path, tmp_path, "method=sparsevlm", "batch_size=2"))


@pytest.mark.parametrize("positions", ["original", "contiguous"])
@pytest.mark.parametrize("name", ["fastv", "random_intra"])
def test_intra_llm_rows_of_different_counts_under_both_position_policies(fam, name, positions):
    """Intra-LLM pruning of rows with different visual-token counts (left-padded again inside the LLM) equals
    each sample alone, with original positions (gaps) and closed up (1-D RoPE families; M-RoPE keeps original)."""
    if fam.family == "llava":
        pytest.skip("one fixed grid: the rows never differ")
    alone, batched = run_alone_and_batched(fam, resolve_method(name, positions=positions), 0.25)
    assert len({c.n_visual_in for _, _, c in alone}) > 1
    assert_same(alone, batched)


def test_ragged_rows_without_padding_mask(tmp_path_factory):
    """Rows of equal length but different visual counts: the processor pads nothing (SDPA may then pass no mask),
    yet the rows keep different counts inside the LLM; the fillers must still be masked, at prefill and decode."""
    from conftest import load_tiny, tiny_checkpoint

    fam = load_tiny(tiny_checkpoint("internvl", tmp_path_factory), family="internvl")
    items = samples(fam)[:2]  # 16 and 48 visual tokens
    base = items[0]["text"]
    for extra in range(1, 200):  # lengthen row 0's question until both rows have the same length
        question = QUESTIONS[0] + " word" * extra
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        items[0]["text"] = fam.processor.apply_chat_template(conv, add_generation_prompt=True)
        lengths = [single(fam, s)["input_ids"].shape[1] for s in items]
        if lengths[0] >= lengths[1]:
            break
    if lengths[0] != lengths[1]:
        pytest.skip(f"no equal-length pair found ({lengths}, from {base[:20]!r})")
    assert bool(batch(fam, items)["attention_mask"].all())
    method = resolve_method("random_intra", positions="contiguous")
    one = []
    with install(fam.seams, method, keep=0.25, seed=0) as inst:
        for seed, sample in zip(SEEDS[:2], items, strict=True):
            inst.reseed(seed)
            one.append(greedy(fam, single(fam, sample)) + (inst.counts,))
        inst.reseed_rows(SEEDS[:2])
        tokens, logits = greedy(fam, batch(fam, items))
        counts = list(inst.state.row_counts)
    assert_same([(t[0], lg[0], c) for t, lg, c in one], (tokens, logits, counts))
