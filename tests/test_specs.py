import pytest
import torch

from hookwise.errors import ModelResolveError
from hookwise.introspect import SPECS, build_spec, describe, load_model, spec_names

TESTED_COUNTS = {
    "flux.1-dev": 11_901_408_320,
    "wan2.1-t2v-14b": 14_288_491_584,
    "wan2.1-t2v-1.3b": 1_418_996_800,
    "hunyuanvideo": 12_821_012_544,
}


@pytest.mark.parametrize("name", sorted(TESTED_COUNTS))
def test_full_size_parameter_counts(name):
    model = build_spec(name)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == TESTED_COUNTS[name]


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_every_spec_builds_on_meta_with_its_stated_count_and_known_architecture(spec):
    model = build_spec(spec.name)
    m = describe(model)
    assert m.param_count == spec.params
    assert m.device == "meta"
    assert m.architecture is not None
    assert m.main_towers
    assert m.dtype_bytes == {"bfloat16": m.param_bytes + m.buffer_bytes}  # specs are built in bf16, as shipped


def test_flux_full_size_block_bytes():
    m = describe(build_spec("flux.1-dev"))
    double, single = m.main_towers
    assert (double.num_blocks, single.num_blocks) == (19, 38)
    d, mlp, head = 3072, 4 * 3072, 128

    def linear(i, o):
        return i * o + o

    double_params = (
        2 * linear(d, 6 * d)  # norm1 / norm1_context modulation
        + 8 * linear(d, d)  # to_q/k/v/out and add_q/k/v/to_add_out
        + 4 * head  # q/k norms of both streams
        + 2 * (linear(d, mlp) + linear(mlp, d))  # ff, ff_context
    )
    single_params = linear(d, 3 * d) + linear(d, mlp) + linear(d + mlp, d) + 3 * linear(d, d) + 2 * head
    assert double.blocks[0].param_count == double_params
    assert single.blocks[0].param_count == single_params
    assert double.blocks[0].param_bytes == 2 * double_params  # bf16


def test_spec_names_aliases_and_dtype():
    assert "flux.1-dev" in spec_names()
    model, source = load_model("FLUX", dtype="float8_e4m3fn")
    assert "flux.1-dev" in source
    assert {p.dtype for p in model.parameters()} == {torch.float8_e4m3fn}


def test_unknown_reference_lists_the_choices():
    with pytest.raises(ModelResolveError) as err:
        load_model("not-a-model")
    message = str(err.value)
    for name in spec_names():
        assert name in message
    assert "module:factory" in message
