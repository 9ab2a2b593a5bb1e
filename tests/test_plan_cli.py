"""`hookwise plan MODEL`: the options table, the choice and why, the Python that applies it, or JSON."""

import json

from hookwise.cli import main
import plan_helpers


# autouse fixtures: activations stated, stack checks recorded and not run, each spec built and described once
stated_activations, stack_checks = plan_helpers.stated_activations, plan_helpers.stack_checks
one_map_per_spec = plan_helpers.one_map_per_spec

MACHINE = ["--ram", "64GB", "--h2d", "25GB/s", "--tflops", "130", "--disk-read", "2GB/s"]


def test_plan_a_spec_for_a_stated_gpu_prints_options_choice_why_and_the_python(capsys):
    assert main(["plan", "flux.1-dev", "--vram", "24GB", *MACHINE]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps lines
    assert "Stacks that fit" in out and "Stacks that do not fit" in out and "all resident" in out
    assert "Chosen for goal 'balanced': offload(vram_budget=" in out
    assert "hookwise.apply(transformer, hookwise.Offload(" in out and "hookwise.optimize(" in out


def test_plan_json_for_video_training_is_machine_readable(capsys):
    args = ["plan", "wan2.1-t2v-14b", "--vram", "80GB", *MACHINE, "--resolution", "480x832", "--frames", "81",
            "--training", "--goal", "quality", "--json"]  # fmt: skip
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["job"]["frames"] == 81 and data["job"]["training"] and data["goal"] == "quality"
    assert data["chosen"]["label"] == "all resident" and data["chosen"]["quality"] == "exact"
    assert data["activation"]["method"] == "stated"
    assert all("cached" not in o["quality"] for o in data["options"])  # no step cache while training


def test_plan_that_fits_nowhere_exits_nonzero_and_says_why(capsys):
    assert main(["plan", "flux.1-dev", "--vram", "2GB", "--ram", "8GB", "--disk-read", "2GB/s", "--tflops", "130"]) == 1
    assert "None fits" in " ".join(capsys.readouterr().out.split())  # rich wraps lines


def test_plan_with_a_bad_size_is_a_clear_error(capsys):
    assert main(["plan", "flux.1-dev", "--vram", "lots"]) == 2
    assert "not a size" in capsys.readouterr().err


def test_plan_checks_the_chosen_stack_on_fake_tensors_by_default_as_optimize_does(capsys, stack_checks):
    import inspect

    from hookwise.plan import make_plan, optimize

    # One default for the library and the command: verify the stack really applied.
    assert inspect.signature(make_plan).parameters["stack_check"].default is None
    assert inspect.signature(optimize).parameters["stack_check"].default is None
    assert main(["plan", "flux.1-dev", "--vram", "24GB", *MACHINE, "--json"]) == 0
    assert len(stack_checks) == 1  # the best option's fake run was asked for
    json.loads(capsys.readouterr().out)
    stack_checks.clear()
    assert main(["plan", "flux.1-dev", "--vram", "24GB", *MACHINE, "--json", "--no-stack-check"]) == 0
    assert stack_checks == []


def test_plan_offers_fp8_compute_only_for_a_gpu_with_fp8_matmul(capsys):
    def options(*extra):
        assert main(["plan", "flux.1-dev", "--vram", "80GB", *MACHINE, "--json", "--no-stack-check", *extra]) == 0
        data = json.loads(capsys.readouterr().out)
        return data, [o["label"] for o in data["options"]]

    stated, labels = options("--fp8")
    assert stated["hardware"]["fp8"] is True
    assert "casting(scaling=channel, compute=fp8)" in labels and "casting(scaling=tensor, compute=fp8)" in labels
    assert "quantization(scheme=fp8-dynamic)" in labels  # the same flag governs quantization's fp8 matmul
    assert stated["chosen"]["label"] == "quantization(scheme=fp8-dynamic)"  # 0.70x of bf16 assumed, casting's 0.75x
    named, labels = options("--gpu", "RTX 4090")  # compute capability 8.9
    assert named["hardware"]["fp8"] is True and named["hardware"]["capability"] == [8, 9]
    assert any("compute=fp8" in label for label in labels)
    for extra in ((), ("--gpu", "RTX 3090")):
        data, labels = options(*extra)
        assert data["hardware"]["fp8"] is False and not any("compute=fp8" in label for label in labels)
        assert data["chosen"]["label"] == "all resident"
    stated_off, labels = options("--gpu", "RTX 4090", "--no-fp8")
    assert stated_off["hardware"]["fp8"] is False and not any("compute=fp8" in label for label in labels)
    assert not any("fp8-dynamic" in label for label in labels)
