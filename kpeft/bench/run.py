"""One benchmark run: build the models, measure, and assemble the result (a JSON-able dict)."""

from __future__ import annotations

import dataclasses
import logging
import platform
import re
import time
from dataclasses import dataclass

import torch

from kpeft.bench import measure, report
from kpeft.bench.timing import Clock
from kpeft.bench.zoo import (
    BACKBONE,
    BUDGETS,
    Entry,
    build_backbone_entry,
    build_method,
    build_peft_lora,
    load_backbone,
    near_square,
)
from kpeft.compose import available
from kpeft.methods.kron import KronA
from kpeft.tasks.base import IGNORE

log = logging.getLogger("kpeft.bench")
# Methods whose peak training memory is also measured with train.gradient_checkpointing=true.
CHECKPOINTING_METHODS = ("lora", "prefix", "inducer")


@dataclass
class Options:
    """What to measure and how (the CLI's flags; see ``python -m kpeft.bench --help``)."""

    model: str = "gpt2"
    methods: tuple[str, ...] = ()  # empty: every method in conf/method
    budgets: tuple[str, ...] = BUDGETS  # the first one that sizes a method is used
    batch: int = 4
    seq_len: int = 64
    target_frac: float = 0.5  # the scored (target) part of each training row
    repeats: int = 5
    warmup: int = 1  # untimed steps per model (the first one also checks that it trains)
    latency_batch: int = 1  # KronA Appendix C: batch 1, sequence length 10
    latency_seq_len: int = 10
    latency_repeats: int = 40
    decode_batch: int = 16
    decode_prompts: int = 16
    decode_prompt_len: int = 24
    decode_new_tokens: int = 16
    decode_repeats: int = 5
    krona_repeats: int = 20
    peft_rank: int = 54
    slow_factor: float = 8.0  # models whose warm-up step is this much slower than PEFT's are timed once
    threads: int = 1  # torch threads; 0: torch's default
    clock: str = "auto"  # CPU: "cpu" (process CPU time) with one thread, else "wall"
    device: str = "auto"
    seed: int = 0


QUICK = {"model": "tiny_gpt2", "batch": 2, "seq_len": 16, "repeats": 2, "latency_repeats": 3,
         "decode_prompt_len": 8, "decode_new_tokens": 4, "decode_repeats": 1, "krona_repeats": 3}


def host_kind(device: torch.device, threads: int) -> str:
    """``cuda-<gpu name>`` or ``cpu-<threads>t``: the results file's name."""
    if device.type == "cuda":
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return f"cpu-{threads}t"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version()}


def warm_up(entry: Entry, batch, clock: Clock) -> Entry:
    """The entry's first (untimed) training step; its duration decides how often it is timed."""
    entry.model.train()
    entry.first_step_s = clock(lambda: measure.train_step(entry, batch))
    return entry


def build_entries(opts: Options, base, methods: list[str], batch, clock: Clock) -> tuple[list[Entry], dict[str, str]]:
    """Every method that builds on the backbone and takes a training step on `batch` (its first
    warm-up step), and why the others did not."""
    entries, skipped = [], {}
    for m in methods:
        try:
            entries.append(warm_up(build_method(base, opts.model, m, opts.budgets), batch, clock))
        except Exception as err:  # a method that cannot run here is reported, not fatal
            skipped[m] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log.warning("skipping %s: %s", m, skipped[m])
    return entries, skipped


def _kron_shapes(entries: list[Entry], d: int) -> tuple[list[int], list[int]]:
    """The factor shapes of the benchmarked KronA (else near-square ones for width `d`)."""
    for e in entries:
        for comp in e.adapted.all_components() if e.adapted else ():
            if isinstance(comp, KronA):
                return list(comp.A.shape), list(comp.B.shape)
    return near_square(d)


def _train_phase(opts: Options, peft: Entry, entries: list[Entry], batch, clock: Clock) -> tuple[dict, list[Entry]]:
    """Median step times, and the models timed once: far slower ones (SAID's projection, a long
    soft prompt) are far from any target."""
    slow = [e for e in entries if e.first_step_s > opts.slow_factor * peft.first_step_s]
    fast = [peft, *(e for e in entries if e not in slow)]
    log.info("training steps: %d models × %d repeats, %d once", len(fast), opts.repeats, len(slow))
    train_s = measure.train_times(fast, batch, opts.repeats, clock, opts.warmup - 1)
    train_s.update(measure.train_times(slow, batch, 1, clock, opts.warmup - 1))
    return train_s, slow


def _latency_phase(opts: Options, backbone: Entry, entries: list[Entry], ids, clock: Clock):
    """Unmerged latencies of every model, then merged ones of the mergeable methods (timed with
    the backbone and full fine-tuning again, in the same rounds)."""
    log.info("inference latency")
    latency_s = measure.latencies([backbone, *entries], ids, opts.latency_repeats, clock)
    mergeable = [e for e in entries if e.mergeable]
    reference = [e for e in [backbone, *entries] if e.name in (BACKBONE, report.FINETUNE)]
    for e in mergeable:
        e.adapted.merge()
    try:
        merged_s = measure.latencies([*reference, *mergeable], ids, opts.latency_repeats, clock)
    finally:
        for e in mergeable:
            e.adapted.unmerge()
    return latency_s, merged_s, [e.name for e in mergeable]


def run(opts: Options) -> dict:
    """Measure everything of issue 8 on one backbone, in this process; the result dict."""
    t0 = time.perf_counter()
    device = _device(opts.device)
    old_threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    threads = torch.get_num_threads()
    clock = Clock(device, opts.clock if opts.clock != "auto" else ("cpu" if threads == 1 else "wall"))
    try:
        result = _measure(opts, device, clock)
    finally:
        torch.set_num_threads(old_threads)
    result["setup"].update(
        host_kind=host_kind(device, threads), threads=threads, device=str(device), clock=clock.kind,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        versions=_versions(), wall_s=round(time.perf_counter() - t0, 1),
    )
    result["targets"] = report.check_targets(result)
    result["targets_met"] = all(v["met"] for v in result["targets"].values())
    return result


def _measure(opts: Options, device: torch.device, clock: Clock) -> dict:
    methods = list(opts.methods) or [m for m in available("method") if m != "zero_shot"]  # zero_shot: nothing to time
    base = load_backbone(opts.model, device, opts.seed)
    vocab, d = base.config.vocab_size, base.config.hidden_size
    batch = measure.lm_batch(vocab, opts.batch, opts.seq_len, opts.target_frac, device, opts.seed)
    entries, skipped = build_entries(opts, base, methods, batch, clock)
    built = [e.name for e in entries]
    backbone = build_backbone_entry(base)
    peft = warm_up(build_peft_lora(base, opts.model, r=opts.peft_rank), batch, clock)
    log.info("built %d methods (%s skipped)", len(entries), ", ".join(skipped) or "none")

    train_s, slow = _train_phase(opts, peft, entries, batch, clock)
    log.info("peak memory")
    peak = measure.peak_memory([peft, *entries], batch, device)
    checkpointed = [e for e in entries if e.name in CHECKPOINTING_METHODS]
    log.info("gradient checkpointing memory (%s)", ", ".join(e.name for e in checkpointed) or "none")
    ck_ratio = measure.checkpointing_memory_ratio(checkpointed, batch, device)
    ids = torch.randint(0, vocab, (opts.latency_batch, opts.latency_seq_len),
                        generator=torch.Generator().manual_seed(opts.seed)).to(device)
    latency_s, merged_s, mergeable = _latency_phase(opts, backbone, entries, ids, clock)

    log.info("greedy decoding")
    prompts = measure.random_prompts(vocab, opts.decode_prompts, opts.decode_prompt_len, opts.seed)
    decode = measure.decode_throughput(backbone.model, prompts, opts.decode_new_tokens, opts.decode_batch,
                                       opts.decode_repeats, clock)
    a_shape, b_shape = _kron_shapes(entries, d)
    kron = measure.krona_speedup(a_shape, b_shape, opts.batch * opts.seq_len, opts.krona_repeats, clock, device)

    result = report.ratios(built, mergeable, train_s, peak, latency_s, merged_s)
    tps = decode["tokens_per_s"]
    result.update(
        decode_speedup_vs_naive=round(tps["ours"] / tps["naive"], 3),
        decode_ratio_vs_hf_generate=round(tps["ours"] / tps["hf_generate"], 3),
        decode_tokens_per_s={k: round(v, 2) for k, v in tps.items()},
        decode_match_naive=decode["match_naive"],
        decode_match_hf_generate=decode["match_hf_generate"],
        krona_reshape_speedup=round(kron["speedup"], 3),
        krona_reshape_speedup_forward=round(kron["speedup_forward"], 3),
        seconds={
            "train_step": {k: round(v, 5) for k, v in train_s.items()},
            "latency": {k: round(v, 6) for k, v in latency_s.items()},
            "latency_merged": {k: round(v, 6) for k, v in merged_s.items()},
            "krona": {k: round(v, 7) for k, v in kron["times_s"].items()},
        },
        peak_mb={k: round(v / 2**20, 1) for k, v in peak.items()},
        gradient_checkpointing_mem_ratio={k: round(v, 4) for k, v in ck_ratio.items()},
        skipped=skipped,
    )
    result["setup"] = {
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(opts).items()},
        "methods": built,
        "timed_once": [e.name for e in slow],
        "target_tokens": int((batch["labels"][0, 1:] != IGNORE).sum()),
        "latency": {"batch": opts.latency_batch, "seq_len": opts.latency_seq_len, "repeats": opts.latency_repeats},
        "decode": {"batch": opts.decode_batch, "prompts": opts.decode_prompts, "prompt_len": opts.decode_prompt_len,
                   "new_tokens": opts.decode_new_tokens, "repeats": opts.decode_repeats},
        "krona": {"a_shape": a_shape, "b_shape": b_shape, "tokens": opts.batch * opts.seq_len},
        "models": {e.name: {"budget": e.budget, "trainable": e.trainable, "trainable_pct": round(e.trainable_pct, 4),
                            "mergeable": e.mergeable} for e in [*entries, peft]},
    }
    return result
