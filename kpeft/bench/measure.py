"""What the benchmark measures: training steps, peak memory, inference latency, greedy decoding
and KronA's reshape product. Every function times callables on the same inputs, interleaved
(:func:`~kpeft.bench.timing.round_robin`), and returns medians in seconds."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from omegaconf import OmegaConf

from kpeft.bench.timing import Clock, medians, peak_bytes, resident_bytes, round_robin
from kpeft.bench.zoo import Entry
from kpeft.methods.kron import kron_matmul
from kpeft.tasks.base import IGNORE, Task
from kpeft.training.decode import greedy_decode
from kpeft.training.memory import disable_gradient_checkpointing, enable_gradient_checkpointing

LM_TASK = Task(OmegaConf.create({"name": "bench", "kind": "causal_lm"}))


def lm_batch(vocab: int, batch: int, seq_len: int, target_frac: float, device: torch.device,
             seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens; only the last `target_frac` of each row is scored (a prompt, then its
    target, as in the NLG tasks)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    labels = ids.clone()
    labels[:, : seq_len - max(1, round(target_frac * seq_len))] = IGNORE
    batch_ = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch_.items()}


def train_step(entry: Entry, batch: dict[str, torch.Tensor], max_grad_norm: float = 1.0) -> None:
    """One optimizer step as the training loop takes it: forward, loss over the target tokens
    (logits at target positions only), backward, clipping, AdamW, gradients freed."""
    loss, n = LM_TASK.loss(entry.model, batch)
    (loss / max(n, 1)).backward()
    torch.nn.utils.clip_grad_norm_(entry.params, max_grad_norm)
    entry.optimizer.step()
    entry.optimizer.zero_grad(set_to_none=True)


def train_times(entries: Sequence[Entry], batch, repeats: int, clock: Clock, warmup: int = 0) -> dict[str, float]:
    """Median seconds per training step of every entry (after `warmup` untimed rounds)."""
    for e in entries:
        e.model.train()
    fns = {e.name: (lambda e=e: train_step(e, batch)) for e in entries}
    return medians(round_robin(fns, repeats, clock, max(warmup, 0)))


def peak_memory(entries: Sequence[Entry], batch, device: torch.device) -> dict[str, int]:
    """Peak bytes of one training step of each entry, as if it were alone: its parameters,
    buffers and optimizer state, plus the step's peak (activations, gradients, temporaries).
    Call after at least one step, so that the optimizer state exists."""
    out = {}
    for e in entries:
        e.model.train()
        out[e.name] = resident_bytes(e.model, e.optimizer) + peak_bytes(lambda e=e: train_step(e, batch), device)
    return out


def checkpointing_memory_ratio(entries: Sequence[Entry], batch, device: torch.device) -> dict[str, float]:
    """Peak memory of a training step with ``train.gradient_checkpointing`` over the peak without
    (both as in :func:`peak_memory`), per entry."""
    out = {}
    for e in entries:
        plain = peak_memory([e], batch, device)[e.name]
        enable_gradient_checkpointing(e.model)
        try:
            out[e.name] = peak_memory([e], batch, device)[e.name] / plain
        finally:
            disable_gradient_checkpointing(e.model)
    return out


def latencies(entries: Sequence[Entry], ids: torch.Tensor, repeats: int, clock: Clock) -> dict[str, float]:
    """Median seconds of one inference forward of each entry on `ids` (no gradients)."""
    for e in entries:
        e.model.eval()

    def forward(e: Entry):
        with torch.no_grad():
            e.model(input_ids=ids)

    fns = {e.name: (lambda e=e: forward(e)) for e in entries}
    return medians(round_robin(fns, repeats, clock, warmup=2))


# ---------------------------------------------------------------- decoding
def naive_decode(model, prompt: Sequence[int], new_tokens: int) -> list[int]:
    """The official code's loop: batch 1, no cache, the whole prefix re-encoded every step."""
    device = next(model.parameters()).device
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def hf_generate(model, prompts: Sequence[Sequence[int]], new_tokens: int, pad_id: int = 0) -> list[list[int]]:
    """transformers' ``generate`` (greedy, KV cache) on the left-padded batch of `prompts`."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p))
        mask[i, width - len(p):] = 1
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=pad_id, eos_token_id=None, bos_token_id=None)
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    return out[:, width:].tolist()


def random_prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts of lengths between length/2 and `length`."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, length // 2), length + 1, (n,), generator=gen).tolist()
    return [torch.randint(0, vocab, (k,), generator=gen).tolist() for k in lengths]


def decode_throughput(model, prompts, new_tokens: int, batch: int, repeats: int, clock: Clock) -> dict:
    """Generated tokens per second of our batched cached decoder, of transformers' ``generate``
    at the same batch, and of the naive loop (once: it is the slow one), plus how many of the
    naive / ``generate`` continuations ours reproduces exactly."""
    model.eval()
    outputs: dict[str, list] = {}

    def ours():
        outputs["ours"] = greedy_decode(model, prompts, max_new_tokens=new_tokens, batch_size=batch)

    def hf():
        outputs["hf"] = [t for i in range(0, len(prompts), batch)
                         for t in hf_generate(model, prompts[i: i + batch], new_tokens)]

    times = medians(round_robin({"ours": ours, "hf_generate": hf}, repeats, clock, warmup=1))
    times["naive"] = clock(lambda: outputs.__setitem__("naive", [naive_decode(model, p, new_tokens) for p in prompts]))
    tokens = new_tokens * len(prompts)

    def agree(other: str) -> float:
        return sum(a == b for a, b in zip(outputs["ours"], outputs[other])) / len(prompts)

    return {
        "tokens_per_s": {k: tokens / t for k, t in times.items()},
        "match_naive": agree("naive"),
        "match_hf_generate": agree("hf"),
    }


# ---------------------------------------------------------------- KronA
def kron_paths(a_shape, b_shape, tokens: int, device: torch.device, seed: int = 0) -> dict:
    """The two ways to train ``x (A ⊗ B)``: KronA's reshape product and the materialised
    Kronecker matrix (``torch.kron`` inside the step, so gradients reach A and B), each forward
    + backward on the same `tokens` rows; and both forward-only, the Kronecker matrix formed
    once. Each callable returns its output (the tests check that they agree)."""
    gen = torch.Generator().manual_seed(seed)
    (m1, n1), (m2, n2) = a_shape, b_shape

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_(True)

    A, B, x = leaf(m1, n1), leaf(m2, n2), leaf(tokens, m1 * m2)
    grad = torch.randn(tokens, n1 * n2, generator=gen).to(device)
    dense_w = torch.kron(A, B).detach()

    def step(product):
        def run():
            out = product()
            out.backward(grad)
            A.grad = B.grad = x.grad = None
            return out
        return run

    def no_grad(product):
        def run():
            with torch.no_grad():
                return product()
        return run

    return {
        "reshape": step(lambda: kron_matmul(x, A, B)),
        "materialised": step(lambda: x @ torch.kron(A, B)),
        "reshape_forward": no_grad(lambda: kron_matmul(x, A, B)),
        "precomputed_forward": no_grad(lambda: x @ dense_w),
    }


def krona_speedup(a_shape, b_shape, tokens: int, repeats: int, clock: Clock, device: torch.device) -> dict:
    """Median times of :func:`kron_paths` and the reshape product's speed-up over them."""
    fns = kron_paths(a_shape, b_shape, tokens, device)
    times = medians(round_robin(fns, repeats, clock, warmup=2))
    return {
        "times_s": times,
        "speedup": times["materialised"] / times["reshape"],
        "speedup_forward": times["precomputed_forward"] / times["reshape_forward"],
    }
