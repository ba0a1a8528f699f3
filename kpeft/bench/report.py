"""From measured seconds and bytes to the benchmark's ratios, targets and tables.

Ratios (issue 8): training step time over PEFT's LoRA-54 (``train_ratio_vs_peft_lora``), peak
memory over full fine-tuning (``mem_ratio_vs_finetune``), inference latency over the plain
backbone (``merged_latency_ratio`` after ``merge()`` for mergeable methods,
``unmerged_latency_ratio`` for every method), and KronA's Table 2 layout: latency and training
time with full fine-tuning = 100 (mergeable methods merged). Also reported, without a target:
``gradient_checkpointing_mem_ratio``, the peak memory of a step with gradient checkpointing over
the peak without (LoRA, prefix, inducer).
"""

from __future__ import annotations

from kpeft.bench.zoo import BACKBONE, PEFT_LORA

FINETUNE = "finetune"
# Targets of the training-step ratio by method family (None: reported, no target).
WEIGHT_DELTA, INDUCER, ADAPTER = 1.10, 1.35, 1.25
ADAPTERS = ("adapter", "parallel_adapter", "mam_adapter", "compacter", "prefix", "krona_b", "krona_b_res")
MEM_TARGET, LATENCY_TOL = 0.80, 0.03
DECODE_NAIVE_TARGET, DECODE_HF_TARGET = 10.0, 1.0


def train_target(method: str) -> float | None:
    if method in ("lora", "krona") or method.startswith(("kernel_wise", "kernel_mix")):
        return WEIGHT_DELTA
    if method.startswith("inducer") or method == "mam_inducer":
        return INDUCER
    return ADAPTER if method in ADAPTERS else None


def _ratios(values: dict[str, float], ref: float, names) -> dict[str, float]:
    return {n: round(values[n] / ref, 4) for n in names if n in values}


def ratios(methods: list[str], mergeable: list[str], train_s: dict, peak: dict, latency_s: dict,
           merged_s: dict) -> dict:
    """The ratio sections of the result (see the module docstring). `latency_s`: every model
    unmerged, with the backbone and full fine-tuning; `merged_s`: the mergeable ones merged, with
    the backbone and full fine-tuning again (timed in the same interleaved rounds)."""
    out: dict = {}
    if PEFT_LORA in train_s:
        out["train_ratio_vs_peft_lora"] = _ratios(train_s, train_s[PEFT_LORA], methods)
    if FINETUNE in peak:
        out["mem_ratio_vs_finetune"] = _ratios(peak, peak[FINETUNE], [m for m in methods if m != FINETUNE])
        if PEFT_LORA in peak:
            out["mem_ratio_vs_finetune"][PEFT_LORA] = round(peak[PEFT_LORA] / peak[FINETUNE], 4)
    if BACKBONE in latency_s:
        out["merged_latency_ratio"] = _ratios(merged_s, merged_s[BACKBONE], mergeable)
        out["unmerged_latency_ratio"] = _ratios(latency_s, latency_s[BACKBONE], methods)
    if FINETUNE in train_s and FINETUNE in latency_s and FINETUNE in merged_s:
        def latency(m: str) -> float:
            return merged_s[m] / merged_s[FINETUNE] if m in mergeable else latency_s[m] / latency_s[FINETUNE]

        out["table2"] = {
            m: {"latency": round(100 * latency(m), 1), "training_time": round(100 * train_s[m] / train_s[FINETUNE], 1)}
            for m in methods if m in train_s and m in latency_s
        }
    return out


def check_targets(result: dict) -> dict[str, dict]:
    """Every target of issue 8 that the result can be checked against: value, target, met."""
    checks: dict[str, dict] = {}

    def add(key: str, value: float, target: str, met: bool) -> None:
        checks[key] = {"value": value, "target": target, "met": bool(met)}

    for m, r in result.get("train_ratio_vs_peft_lora", {}).items():
        t = train_target(m)
        if t is not None:
            add(f"train_ratio_vs_peft_lora.{m}", r, f"<= {t:.2f}", r <= t)
    for m, r in result.get("mem_ratio_vs_finetune", {}).items():
        add(f"mem_ratio_vs_finetune.{m}", r, f"<= {MEM_TARGET:.2f}", r <= MEM_TARGET)
    for m, r in result.get("merged_latency_ratio", {}).items():
        add(f"merged_latency_ratio.{m}", r, f"1.00 ± {LATENCY_TOL:.2f}", abs(r - 1.0) <= LATENCY_TOL)
    if "decode_speedup_vs_naive" in result:
        r = result["decode_speedup_vs_naive"]
        add("decode_speedup_vs_naive", r, f">= {DECODE_NAIVE_TARGET:g}", r >= DECODE_NAIVE_TARGET)
    if "decode_ratio_vs_hf_generate" in result:
        r = result["decode_ratio_vs_hf_generate"]
        add("decode_ratio_vs_hf_generate", r, f">= {DECODE_HF_TARGET:g}", r >= DECODE_HF_TARGET)
    if "krona_reshape_speedup" in result:
        r = result["krona_reshape_speedup"]
        add("krona_reshape_speedup", r, "> 1", r > 1.0)
    return checks


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def provenance_lines(result: dict) -> list[str]:
    """``Measured by code <commit>, lock <hash>, torch <version>.`` when the result carries its provenance."""
    prov = result.get("provenance")
    if not prov:
        return []
    from kpeft.compare_records import code_version

    lock = (prov.get("lock") or {}).get("sha256") or "none"
    return ["", f"Measured by code {code_version(prov)}, lock {lock[:12]}, torch {prov['versions'].get('torch')} "
                f"({prov.get('created', '')})."]


def markdown(result: dict) -> str:
    """The per-method table, decoding and KronA lines, and the set-up, as Markdown."""
    setup = result["setup"]
    train = result.get("train_ratio_vs_peft_lora", {})
    mem = result.get("mem_ratio_vs_finetune", {})
    merged = result.get("merged_latency_ratio", {})
    unmerged = result.get("unmerged_latency_ratio", {})
    t2 = result.get("table2", {})
    rows = [
        "| method | budget | trainable | train × PEFT LoRA (target) | peak memory × FT | latency × backbone "
        "| Table 2 latency (FT = 100) | Table 2 training time (FT = 100) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in [*setup["methods"], PEFT_LORA]:
        info = setup["models"].get(m, {})
        target = train_target(m)
        train_cell = _fmt(train.get(m)) + (f" (≤ {target:.2f})" if target is not None and m in train else "")
        if m in merged:
            lat = f"{_fmt(merged[m])} merged ({_fmt(unmerged.get(m))} unmerged)"
        else:
            lat = _fmt(unmerged.get(m))
        t2m = t2.get(m, {})
        rows.append(
            f"| {m} | {info.get('budget') or '–'} | {info.get('trainable_pct', 0):.2f}% | {train_cell} "
            f"| {_fmt(mem.get(m))} | {lat} | {_fmt(t2m.get('latency'), 0)} | {_fmt(t2m.get('training_time'), 0)} |"
        )
    lines = [f"### `python -m kpeft.bench` on {setup['host_kind']} ({setup['device_name']})", "", *rows, ""]
    if "decode_speedup_vs_naive" in result:
        tps = result["decode_tokens_per_s"]
        lines.append(
            f"Greedy decoding, {setup['decode']['prompts']} prompts, {setup['decode']['new_tokens']} new tokens: "
            f"ours {tps['ours']:.1f} tokens/s (batch {setup['decode']['batch']}, KV cache), naive loop "
            f"{tps['naive']:.1f} (batch 1, no cache), `generate` {tps['hf_generate']:.1f} → "
            f"**{result['decode_speedup_vs_naive']:.1f}×** the naive loop, **{result['decode_ratio_vs_hf_generate']:.2f}×** "
            f"`generate` (same tokens: {result['decode_match_naive']:.0%} / {result['decode_match_hf_generate']:.0%} of prompts)."
        )
    if "krona_reshape_speedup" in result:
        k = setup["krona"]
        lines.append(
            f"KronA A {tuple(k['a_shape'])}, B {tuple(k['b_shape'])} on {k['tokens']} tokens: the reshape product is "
            f"**{result['krona_reshape_speedup']:.1f}×** faster than the materialised Kronecker matrix (forward + "
            f"backward), {result['krona_reshape_speedup_forward']:.1f}× forward-only against a precomputed one."
        )
    if result.get("gradient_checkpointing_mem_ratio"):
        cells = ", ".join(f"{m} {r:.2f}×" for m, r in result["gradient_checkpointing_mem_ratio"].items())
        lines.append(f"Peak training memory with `train.gradient_checkpointing=true` over without: {cells}.")
    checks = result.get("targets", {})
    missed = [k for k, v in checks.items() if not v["met"]]
    lines.append(f"Targets met: {len(checks) - len(missed)} of {len(checks)}" + (f"; missed: {', '.join(missed)}." if missed else "."))
    lines.append("")
    once = setup.get("timed_once") or []
    lines.append(
        f"Set-up: model `{setup['model']}` (random init), training batch {setup['batch']} × {setup['seq_len']} tokens "
        f"({setup['target_tokens']} scored per row), {setup['repeats']} interleaved repeats (medians"
        + (f"; {', '.join(once)} timed once: warm-up step > {setup['slow_factor']:g}× PEFT LoRA's" if once else "")
        + f"); latency batch {setup['latency']['batch']} × {setup['latency']['seq_len']}, "
        f"{setup['latency']['repeats']} repeats; {setup['threads']} thread(s), {setup['clock']} clock; "
        f"torch {setup['versions']['torch']}, transformers {setup['versions']['transformers']}, "
        f"peft {setup['versions']['peft']}; {setup['wall_s']:.0f} s wall."
    )
    lines += provenance_lines(result)
    return "\n".join(lines) + "\n"
