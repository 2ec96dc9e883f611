"""rlvr_optim.AdamW in transformers.Trainer, TRL's GRPOTrainer, torch.compile, AMP and CUDA graphs.

Each trainer runs 3 real steps of a tiny randomly initialised Llama (bf16, CPU). A
probe callback snapshots the weights right before every optimizer step and compares
them right after it with the optimizer's bitmaps; the logged statistics must equal the
same numbers computed from those snapshots.
"""

import pytest
import torch

from rlvr_optim import AdamW, bitmaps
from rlvr_optim.integrations import ChangeStats, log_change_stats, unwrap_optimizer

VOCAB = ["<pad>", "<eos>", "<unk>"] + [chr(c) for c in range(ord("a"), ord("a") + 29)]
PREFIX = "rlvr_optim/"
STEPS = 3


def _transformers():
    return pytest.importorskip("transformers")


def _tiny_llama(seed=0):
    transformers = _transformers()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return _transformers().PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _bits(model):
    return {n: p.detach().view(torch.int16).reshape(-1).clone()
            for n, p in model.named_parameters()}


def _probe():
    """A TrainerCallback that checks the bitmaps around every optimizer step."""

    class Probe(_transformers().TrainerCallback):
        """Per step: do the optimizer's bitmaps equal a diff of the weights around opt.step()?"""

        def __init__(self):
            self.before = None
            self.steps = []  # per step: (all bitmaps matched, changed elements, numel)
            self.cumulative = {}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.before = _bits(model)

        def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            opt = unwrap_optimizer(optimizer)
            after = _bits(model)
            matched, changed, numel = True, 0, 0
            for name, p in model.named_parameters():
                diff = after[name] != self.before[name]
                bits = bitmaps.unpack(opt.change_bitmap(p), p.numel())
                matched &= torch.equal(bits, diff)
                changed += int(diff.sum())
                numel += p.numel()
                self.cumulative[name] = self.cumulative.get(name, torch.zeros_like(diff)) | diff
            self.steps.append((matched, changed, numel))

    return Probe()


def _check(trainer, probe, opt):
    assert len(probe.steps) == STEPS
    for matched, changed, numel in probe.steps:
        assert matched
        assert 0 < changed < numel
    logged = [e for e in trainer.state.log_history if PREFIX + "changed_fraction" in e]
    assert len(logged) == STEPS
    assert all("loss" in e for e in logged)  # merged into the trainer's own entries
    for entry, (_, changed, numel) in zip(logged, probe.steps):
        assert entry[PREFIX + "changed_fraction"] == pytest.approx(changed / numel, rel=1e-12)
        assert entry[PREFIX + "steps"] == 1.0
    cumulative = sum(int(c.sum()) for c in probe.cumulative.values())
    total = sum(c.numel() for c in probe.cumulative.values())
    assert logged[-1][PREFIX + "cumulative_changed_fraction"] == pytest.approx(cumulative / total)
    for name, p in trainer.model.named_parameters():
        assert torch.equal(bitmaps.unpack(opt.cumulative_bitmap(p), p.numel()),
                           probe.cumulative[name])


def test_hf_trainer_runs_and_logs_matching_change_stats(tmp_path):
    transformers = _transformers()
    model = _tiny_llama()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(VOCAB), (8, 12), generator=g)
    data = [{"input_ids": row, "labels": row} for row in ids]
    opt = AdamW(model.named_parameters(), lr=3e-3, track_changes="cumulative",
                rounding="stochastic")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=2,
        logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
    )
    probe = _probe()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizers=(opt, None), callbacks=[probe])
    log_change_stats(trainer)
    trainer.train()
    _check(trainer, probe, opt)


def test_trl_grpo_trainer_runs_and_logs_matching_change_stats(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")

    tokenizer = _tokenizer()
    model = _tiny_llama(1)
    prompts = datasets.Dataset.from_dict(
        {"prompt": [" ".join(VOCAB[3 + (i + k) % 20] for k in range(4)) for i in range(8)]}
    )

    def reward(completions, **kwargs):  # varies between a prompt's completions
        return [float(sum(map(ord, c)) % 7) for c in completions]

    opt = AdamW(model.named_parameters(), lr=3e-3, track_changes="cumulative")
    args = trl.GRPOConfig(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4,
        num_generations=2, max_completion_length=6, beta=0.0, logging_steps=1,
        report_to="none", use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True,
        seed=0, dataloader_num_workers=0,
    )
    probe = _probe()
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args,
                              train_dataset=prompts, processing_class=tokenizer,
                              optimizers=(opt, None), callbacks=[probe])
    log_change_stats(trainer)
    trainer.train()
    _check(trainer, probe, opt)
    # GRPO's own metrics still reach the same entries.
    assert all("reward" in e for e in trainer.state.log_history if PREFIX + "steps" in e)


def test_change_stats_window_means_and_errors():
    g = torch.Generator().manual_seed(5)
    p = torch.randn(64, generator=g).bfloat16().requires_grad_()
    opt = AdamW([p], lr=5e-3, track_changes="step")
    stats = ChangeStats(opt, prefix="")
    assert stats.pop() == {}
    fractions = []
    for _ in range(3):
        before = p.detach().clone()
        p.grad = torch.randn(64, generator=g).bfloat16()
        opt.step()
        stats.update()
        fractions.append(float((p.detach().view(torch.int16) != before.view(torch.int16))
                               .float().mean()))
    out = stats.pop()
    assert out["steps"] == 3.0
    assert out["changed_fraction"] == pytest.approx(sum(fractions) / 3)
    assert "cumulative_changed_fraction" not in out
    assert stats.pop()["steps"] == 0.0 and not stats.pending
    with pytest.raises(ValueError, match="tracks no changes"):
        ChangeStats(AdamW([p]))
    with pytest.raises(TypeError, match="need an rlvr_optim.AdamW optimizer, got SGD"):
        ChangeStats(torch.optim.SGD([p], lr=0.1))


# ------------------------------------------------------------------ torch.compile, AMP, graphs


def _mlp(device="cpu"):
    g = torch.Generator().manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.bfloat16().to(device)


def _train_step(model, opt, x):
    loss = model(x).float().pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


def test_compiled_training_step_gives_the_eager_bits():
    # backend="aot_eager": AOTAutograd traces forward and backward like inductor does but
    # runs the same aten kernels as eager, so eager is an exact reference; inductor's C++
    # compile of even this model takes about a minute on the project's 2 cores. The step
    # itself is a graph break (AdamW.step is torch.compiler.disable'd) and runs eagerly.
    import copy

    model, twin = _mlp(), _mlp()
    options = dict(lr=1e-2, rounding="stochastic", track_changes="step")
    opt, twin_opt = AdamW(model.parameters(), **options), AdamW(twin.parameters(), **options)
    compiled = torch.compile(_train_step, backend="aot_eager")
    g = torch.Generator().manual_seed(8)
    for _ in range(3):
        x = torch.randn(5, 8, generator=g).bfloat16()
        before = copy.deepcopy(_bits(model))
        assert torch.equal(compiled(model, opt, x), _train_step(twin, twin_opt, x))
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(p.detach().view(torch.int16), q.detach().view(torch.int16))
            assert torch.equal(opt.change_bitmap(p), twin_opt.change_bitmap(q))
            assert opt.state[p]["step"].item() == twin_opt.state[q]["step"].item()
        assert any(not torch.equal(before[n], a) for n, a in _bits(model).items())


@pytest.mark.gpu
@pytest.mark.parametrize("backend, track", [("auto", "cumulative"), ("reference", "off")])
def test_capturable_step_replays_in_a_cuda_graph(cuda_device, backend, track):
    """A captured step, replayed with new gradients, stores the bits of eager steps.

    The reference backend is captured without change tracking: bitmaps.pack builds its
    bit-weight table from a Python list, a host copy that a capture refuses.
    """
    options = dict(rounding="stochastic", track_changes=track, backend=backend)
    model, twin = _mlp(cuda_device), _mlp(cuda_device)
    opt = AdamW(model.parameters(), lr=torch.tensor(1e-2, device=cuda_device), capturable=True,
                **options)
    # The twin steps eagerly with its step counts on the host (the CPU scalar path).
    twin_opt = AdamW(twin.parameters(), lr=torch.tensor(1e-2), **options)
    g = torch.Generator(device=cuda_device).manual_seed(9)

    def new_grads():
        return [torch.randn(p.shape, generator=g, device=cuda_device).bfloat16()
                for p in model.parameters()]

    static = new_grads()
    for p, s in zip(model.parameters(), static):
        p.grad = s
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up steps create the state outside the capture
        for _ in range(2):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        for q, s in zip(twin.parameters(), static):
            q.grad = s.clone()
        twin_opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(3):
        grads = new_grads()
        for s, gr in zip(static, grads):
            s.copy_(gr)
        graph.replay()
        for q, gr in zip(twin.parameters(), grads):
            q.grad = gr.clone()
        twin_opt.step()
        torch.cuda.synchronize()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p.detach().view(torch.int16), q.detach().view(torch.int16))
            assert opt.state[p].keys() == twin_opt.state[q].keys()
            for key, value in opt.state[p].items():
                assert torch.equal(value.cpu(), twin_opt.state[q][key].cpu()), key
    assert opt.state[p]["step"].item() == 5
    if track != "off":
        assert int(opt.change_counts(p)[0]) > 0


@pytest.mark.gpu
def test_gradscaler_on_cuda_skips_inf_steps_without_a_host_sync(cuda_device):
    model = torch.nn.Linear(16, 8).to(cuda_device)  # fp32 params under fp16 autocast
    twin = torch.nn.Linear(16, 8).to(cuda_device)
    twin.load_state_dict(model.state_dict())
    opt = AdamW(model.parameters(), lr=1e-2, track_changes="step")
    twin_opt = AdamW(twin.parameters(), lr=1e-2)
    scale = 2.0**10
    scaler = torch.amp.GradScaler("cuda", init_scale=scale)

    def scaled_step(inputs, check_sync=True):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(inputs).float().pow(2).mean()
        scaler.scale(loss).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        # Any host sync inside the step raises. The first step may sync: it creates the
        # state and the backend's pointer tables (as warm-up does before a graph capture).
        torch.cuda.set_sync_debug_mode("error" if check_sync else "default")
        try:
            scaler.step(opt)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.update()
        # Gradients keep their addresses, so the Triton backend's pointer table is reused
        # (it is rebuilt, with a host copy, when a gradient is reallocated).
        opt.zero_grad(set_to_none=False)
        return grads

    for step, check_sync in ((1, False), (2, True)):
        scaled = scaled_step(torch.randn(4, 16, device=cuda_device), check_sync)
        for q, gr in zip(twin.parameters(), scaled):
            q.grad = gr / scale  # the division the step does itself
        twin_opt.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)
            assert opt.state[p]["step"].item() == step
    before = [p.detach().clone() for p in model.parameters()]
    scaled_step(torch.full((4, 16), float("inf"), device=cuda_device))
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
        assert opt.state[p]["step"].item() == 2
        assert opt.change_counts(p)[0].item() == 0
    assert scaler.get_scale() == scale / 2
