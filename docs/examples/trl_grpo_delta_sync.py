"""Delta weight sync in a TRL GRPO run, from the optimizer's change mask (no snapshot).

TRL's delta weight sync (huggingface/trl#5417) keeps a bf16 snapshot of the model, diffs it
after each optimizer step and sends the changed elements to vLLM as a sparse safetensors
patch. Here a ``rlvr_optim.sync.DeltaTracker`` on ``rlvr_optim.AdamW`` replaces the snapshot
and the diff: the optimizer's kernels already flag every element whose bf16 bits changed. A
callback sends one delta per optimizer step to an inference engine; this one is a stand-in
that applies what it receives to its own copy of the weights and records it.

    python docs/examples/trl_grpo_delta_sync.py [OUT_DIR] [--steps N]

A tiny random Llama and a word-level tokenizer, built here: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from rlvr_optim import AdamW
from rlvr_optim.sync import Delta, DeltaTracker, apply_delta

VOCAB = ["<pad>", "<eos>", "<unk>"] + [chr(c) for c in range(ord("a"), ord("a") + 29)]


class FakeEngine:
    """An inference engine's side: applies the deltas it receives, in place, and keeps a
    record of each (sequence, elements changed, file bytes)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.received: list[dict] = []

    def receive(self, data: bytes) -> None:
        delta = Delta.from_bytes(data)
        apply_delta(self.weights, delta)  # refuses a delta out of order, repeated or corrupt
        self.received.append({"sequence": delta.sequence, "changed": delta.changed,
                              "numel": delta.numel, "bytes": len(data)})


def tiny_model_and_tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    raw = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    return model, tokenizer


def main(out_dir: str, steps: int = 3):
    """Train ``steps`` GRPO steps, syncing the engine after each; returns (engine, model)."""
    import datasets
    import transformers
    import trl

    model, tokenizer = tiny_model_and_tokenizer()
    opt = AdamW(model.named_parameters(), lr=3e-3, track_changes="step")
    tracker = DeltaTracker(opt, model.named_parameters())
    engine = FakeEngine(model)  # starts from the same weights as the trainer

    class SyncWeights(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            engine.receive(tracker.collect().to_bytes())

    prompts = datasets.Dataset.from_dict(
        {"prompt": [" ".join(VOCAB[3 + (i + k) % 20] for k in range(4)) for i in range(8)]})

    def reward(completions, **kwargs):  # varies between a prompt's completions
        return [float(sum(map(ord, c)) % 7) for c in completions]

    args = trl.GRPOConfig(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=6, beta=0.0, logging_steps=1, report_to="none", use_cpu=True,
        bf16=False, save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args,
                              train_dataset=prompts, processing_class=tokenizer,
                              optimizers=(opt, None), callbacks=[SyncWeights()])
    trainer.train()
    tracker.close()
    return engine, model


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="trainer output folder (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=3)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        engine, model = main(options.out or scratch, options.steps)
    same = all(torch.equal(engine.weights[n].view(torch.int16), p.detach().view(torch.int16))
               for n, p in model.named_parameters())
    for row in engine.received:
        print(f"sequence {row['sequence']}: {row['changed']} of {row['numel']} elements, "
              f"{row['bytes']} bytes")
    print("engine weights bit-identical to the trainer's:", same)
