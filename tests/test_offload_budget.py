"""The VRAM budget: which groups stay resident, slots counted, clear errors, measured bytes."""

import psutil
import pytest
import torch

from hookwise.memory import Offload, apply_offload, offload_report
from hookwise.memory._budget import BudgetError, parse_budget, spread
from offload_helpers import add_lora, fwd_bwd, strict
from model_helpers import output_of, tiny_musubi

def sizes():
    model, _ = tiny_musubi()
    report = apply_offload(model, Offload(onload_device="cpu", granularity="block"))
    return {g.name: g.nbytes for g in report.groups}


def test_spread_places_streamed_items_evenly():
    assert spread(5, 2) == [1, 3]
    assert spread(10, 5) == [1, 3, 5, 7, 9]
    assert spread(4, 0) == [] and spread(4, 4) == [0, 1, 2, 3] and spread(4, 9) == [0, 1, 2, 3]
    assert spread(6, 3) == [1, 3, 5]


def test_budget_strings_parse_to_bytes():
    cpu = torch.device("cpu")
    assert parse_budget(None, cpu) is None
    assert parse_budget(123, cpu) == 123
    assert parse_budget("12GiB", cpu) == 12 * 2**30
    assert parse_budget("500MB", cpu) == 500 * 10**6
    assert parse_budget("1.5G", cpu) == int(1.5 * 2**30)
    assert parse_budget("80%", cpu) == int(psutil.virtual_memory().total * 0.8)


def single_stream_dit():
    """The musubi-style DiT with six equal single-stream blocks (uniform groups make the arithmetic plain)."""
    from model_helpers import MusubiDiT

    torch.manual_seed(0)
    model = MusubiDiT(depth=0, depth_single=6).eval()
    _, inputs = tiny_musubi()
    return model, inputs


def test_budget_keeps_exactly_the_expected_groups_resident():
    model, inputs = single_stream_dit()
    size = {g.name: g.nbytes for g in apply_offload(single_stream_dit()[0], Offload(onload_device="cpu")).groups}
    block = size["single_blocks.0"]
    assert {size[f"single_blocks.{i}"] for i in range(6)} == {block}
    total = sum(size.values())
    # Streaming s equal blocks costs two slots and saves s blocks: below the model's size the first
    # budget that fits streams 3 of 6. They are spread evenly (tower blocks 1, 3, 5) so each
    # transfer hides behind a resident block; everything outside the tower stays resident.
    budget = total - block
    expected = output_of(model, inputs)
    report = apply_offload(model, Offload(onload_device="cpu", granularity="block", vram_budget=budget))
    streamed = ["single_blocks.1", "single_blocks.3", "single_blocks.5"]
    assert list(report.streamed) == streamed
    assert set(report.resident) == set(size) - set(streamed)
    assert report.planned_device_bytes == budget  # resident groups + two slots, as planned
    assert budget - 64 * len(size) <= report.device_bytes <= budget  # measured (groups are padded in the plan)
    strict(model)
    for _ in range(2):
        assert torch.equal(output_of(model, inputs), expected)
    # Strict mode empties (zero strides) exactly the unbound streamed tensors; resident ones are whole.
    for name in size:
        hollow = [p.dim() > 0 and p.stride() == (0,) * p.dim() for p in model.get_submodule(name).parameters()]
        bound = name in offload_report(model).bound
        assert all(hollow) if (name in streamed and not bound) else not any(hollow), name

    tighter = apply_offload(
        single_stream_dit()[0], Offload(onload_device="cpu", granularity="block", vram_budget=budget - block)
    )
    assert list(tighter.streamed) == ["single_blocks.0", "single_blocks.2", "single_blocks.3", "single_blocks.5"]
    assert tighter.device_bytes <= budget - block


def test_the_budget_counts_the_prefetch_slots_and_says_how_much_is_needed():
    size = sizes()
    largest = max(size.values())
    need = 2 * largest  # nothing must stay resident; two slots (current + prefetch)
    with pytest.raises(BudgetError) as err:
        apply_offload(tiny_musubi()[0], Offload(onload_device="cpu", granularity="block", vram_budget=need - 1))
    assert err.value.need == need
    message = str(err.value)
    assert str(need) in message and "slot" in message
    assert "granularity='leaf' needs" in message and "prefetch=False needs" in message

    report = apply_offload(tiny_musubi()[0], Offload(onload_device="cpu", granularity="block", vram_budget=need))
    assert report.resident == () and report.device_bytes == need  # nothing resident: only the slots
    single = apply_offload(tiny_musubi()[0], Offload(onload_device="cpu", granularity="block", prefetch=False, vram_budget=largest))
    assert single.slots == 1 and single.device_bytes == largest


def test_auto_granularity_falls_back_to_leaves_when_blocks_do_not_fit():
    size = sizes()
    budget = 2 * max(size.values()) - 1
    model, inputs = tiny_musubi()
    expected = output_of(model, inputs)
    report = apply_offload(model, Offload(onload_device="cpu", granularity="auto", vram_budget=budget))
    assert report.granularity == "leaf"
    assert report.device_bytes <= budget
    strict(model)
    assert torch.equal(output_of(model, inputs), expected)


def test_trainable_adapters_count_against_the_budget_and_it_holds_through_backward():
    model, inputs = tiny_musubi()
    add_lora(model)
    expected = fwd_bwd(model, inputs)
    adapters = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    size = sizes()
    budget = adapters + 2 * max(size.values()) + size["img_in"]
    report = apply_offload(model, Offload(onload_device="cpu", granularity="block", vram_budget=budget))
    assert report.device_bytes <= budget
    assert sum(1 for p in report.always_resident if "lora_" in p) == sum(1 for n, _ in model.named_parameters() if "lora_" in n)
    strict(model)
    for _ in range(2):
        out, grads = fwd_bwd(model, inputs)
        assert torch.equal(out, expected[0]) and all(torch.equal(grads[k], expected[1][k]) for k in grads)
    assert offload_report(model).stats["overflow_slots"] == 0
    assert offload_report(model).device_bytes <= budget
