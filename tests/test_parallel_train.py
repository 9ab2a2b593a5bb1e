"""`hookwise train-lora` on 2 gloo ranks (as under torchrun): rank 0 alone writes files and prints, each rank
trains on its slice of the global batch in 2 accumulated micro-batches, and the LoRA and the loss equal one
process's on the whole batch in one pass."""

import contextlib
import io
import json
import os
import shutil
import tempfile

import pytest
import torch
from safetensors.torch import load_file

import hookwise
from hookwise.cli import main

from dist_helpers import share_ranks, shared_results

ARGS = ["--steps", "2", "--batch", "4", "--sample-steps", "2", "--threads", "1", "--formats", "diffusers"]


def _cli(rank, world, out):
    os.makedirs(out, exist_ok=True)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
        code = main(["train-lora", "flux-shapes", "--out", out, *ARGS, "--accumulate", "2"])
    return code, err.getvalue()


# in the session's one spawn of 2 ranks (dist_helpers); the ranks get this process's folder (made by the ranks;
# named here, not made: each spawned rank imports this module too)
TWO = os.path.join(tempfile.gettempdir(), f"hookwise-train-two-ranks-{os.getpid()}")
share_ranks(2, "train_cli", _cli, TWO)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    two = TWO
    try:
        ranks = shared_results(2, "train_cli")
    except BaseException:
        shutil.rmtree(TWO, ignore_errors=True)
        raise
    one = tmp_path_factory.mktemp("one-process")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = hookwise.train_lora("flux-shapes", one, steps=2, batch=4, sample_steps=2, formats=("diffusers",))
    finally:
        torch.set_num_threads(before)
    yield two, ranks, single
    shutil.rmtree(TWO, ignore_errors=True)


def test_only_rank_zero_prints(runs):
    _, ranks, _ = runs
    (code0, out0), (code1, out1) = ranks
    assert code0 == code1 == 0
    assert "LoRA (diffusers)" in out0
    assert "LoRA" not in out1 and "loss" not in out1


def test_two_ranks_accumulating_micro_batches_train_the_lora_one_process_trains_on_the_whole_batch(runs):
    two, _, single = runs
    summary = json.loads((single.out / "training.json").read_text())
    two_summary = json.loads(open(f"{two}/training.json").read())
    assert two_summary["final_loss"] == pytest.approx(summary["final_loss"], rel=1e-4)
    assert two_summary["stack"] == summary["stack"] + ["data_parallel"]
    got = load_file(f"{two}/lora-diffusers.safetensors")
    want = load_file(str(single.files["diffusers"]))
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        # AdamW's first steps are about lr * sign(grad): a near-zero gradient summed in another order moved
        # single elements by up to 7e-6 here (lr 2e-3)
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=2e-5, msg=key)
    assert (single.out / "embedding.safetensors").is_file() and open(f"{two}/embedding.safetensors", "rb").read()


def _odd_batch(rank, world):
    with pytest.raises(hookwise.ConfigError, match="split evenly"):
        hookwise.train_lora("flux-shapes", "/nonexistent", steps=1, batch=3)
    with pytest.raises(hookwise.ConfigError, match="2 ranks x 4 micro-batches.*multiple of 8"):
        hookwise.train_lora("flux-shapes", "/nonexistent", steps=1, batch=4, accumulate=4)
    return True


share_ranks(2, "train_odd_batch", _odd_batch)  # in the session's one spawn of 2 ranks (dist_helpers)


def test_a_batch_that_does_not_split_over_the_ranks_is_refused():
    assert shared_results(2, "train_odd_batch") == [True, True]
