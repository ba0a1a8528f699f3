"""Using what was trained: the Python API (adapt / save_adapter / load_adapter / load_run),
``python -m kpeft.generate`` and ``python -m kpeft.export`` (merged for transformers, LoRA for PEFT).

Everything is built here: tiny random backbones, a byte-level BPE tokenizer of 256 bytes and a
six-entry WebNLG set in prefix-tuning's JSON layout, trained for one epoch through the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import inputs, output, randomise, tiny_model, train_cli
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, GPT2Tokenizer

import kpeft
from kpeft.errors import KpeftError
from kpeft.export import export_merged, export_peft

DOCS = Path(__file__).resolve().parent.parent / "docs"
TRIPLES = [
    ("Alan_Bean", "occupation", "Test_pilot", "Alan Bean was a test pilot."),
    ("Aarhus", "country", "Denmark", "Aarhus is in Denmark."),
    ("Elliot_See", "birthPlace", "Dallas", "Elliot See was born in Dallas."),
    ("Turkey", "capital", "Ankara", "The capital of Turkey is Ankara."),
    ("Bacon", "ingredient", "Pork", "Bacon is made of pork."),
    ("Ajax", "ground", "Amsterdam", "Ajax play in Amsterdam."),
]


# ---------------------------------------------------------------- fixtures: tokenizer, data, runs
def byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (its ``bytes_to_unicode``)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(moved))]


def byte_tokenizer(root: Path) -> Path:
    """A GPT-2 byte-level BPE with the 256 byte symbols and no merges (+ <|endoftext|>)."""
    root.mkdir()
    (root / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate([*byte_symbols(), "<|endoftext|>"])}))
    (root / "merges.txt").write_text("#version: 0.2\n")
    GPT2Tokenizer(vocab=str(root / "vocab.json"), merges=str(root / "merges.txt")).save_pretrained(root)
    return root


def webnlg_folder(root: Path) -> Path:
    root.mkdir()

    def entry(i, s, p, o, text):
        return {str(i + 1): {"category": "Astronaut", "size": 1, "xml_id": f"Id{i + 1}",
                             "modifiedtripleset": [{"subject": s, "property": p, "object": o}],
                             "lexicalisations": [{"lex": text, "comment": "good", "xml_id": "Id1"}]}}

    for name in ("train.json", "dev.json", "test.json"):
        (root / name).write_text(json.dumps({"entries": [entry(i, *t) for i, t in enumerate(TRIPLES)]}))
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return byte_tokenizer(root / "tok"), webnlg_folder(root / "webnlg")


_RUNS: dict[tuple[str, str], Path] = {}


@pytest.fixture(scope="module")
def nlg_run(assets, tmp_path_factory):
    """``(model, method) -> run_dir`` of a short WebNLG run through the CLI (cached)."""
    tok, data = assets

    def get(model: str, method: str) -> Path:
        if (model, method) not in _RUNS:
            budget = "intermediate" if method == "kernel_mix_qvo" else "small"
            run_dir, record, _ = train_cli(
                f"model={model}", f"model.tokenizer={tok}", "task=webnlg", f"task.data_dir={data}",
                "task.options.meteor=off", "task.options.max_new_tokens=6", "task.options.max_eval_examples=5",
                f"method={method}", f"budget={budget}", "train.batch_size=3", "train.epochs=30",  # 60 tiny steps:
                "train.warmup_steps=0", "train.lr=0.03", "train.label_smoothing=0",  # past predicting eos first
                "train.eval_batch_size=2",
                root=tmp_path_factory.mktemp("runs"), threads=1)
            assert record["status"] == "complete"
            _RUNS[(model, method)] = run_dir
        return _RUNS[(model, method)]

    return get


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, timeout=300)


def nlg_batch(run) -> dict[str, torch.Tensor]:
    """Two of the run's test prompts, collated (input ids, mask, token types)."""
    task = run.task
    examples = [task.encode(r) for r in task.records("validation")[:2]]
    batch = task.collate(examples)
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def plain_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A plain transformers model fed kpeft's task embeddings: GPT-2 adds wte(token_type_ids)
    itself; Llama gets inputs_embeds = embed(input_ids) + embed(token_type_ids)."""
    with torch.no_grad():
        if model.config.model_type == "gpt2":
            return model(**batch).logits
        embed = model.get_input_embeddings()
        return model(inputs_embeds=embed(batch["input_ids"]) + embed(batch["token_type_ids"]),
                     attention_mask=batch["attention_mask"]).logits


# ---------------------------------------------------------------- the API
def test_adapt_overrides_and_one_line_errors():
    model = kpeft.adapt(tiny_model("gpt2"), method="lora", budget="small", r=3, alpha=6)
    lora = next(model.all_components())
    assert lora.r == 3 and lora.scaling == 2.0 and model.count().trainable == 2 * 2 * 3 * (32 + 32) + 2 * 2 * 32
    mix = kpeft.adapt(tiny_model("gpt2"), method="kernel_mix_qvo", budget="intermediate", **{"components.kernel_mix.q.wise": 1})
    assert mix.method_cfg.components.kernel_mix.q.wise == 1
    with pytest.raises(KpeftError, match=r"^method 'lora' has no key 'rank'; valid: .*\br\b") as err:
        kpeft.adapt(tiny_model("gpt2"), method="lora", budget="small", rank=8)
    assert "\n" not in str(err.value)
    with pytest.raises(KpeftError, match="^unknown method 'lorax'"):
        kpeft.adapt(tiny_model("gpt2"), method="lorax")


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_save_and_load_adapter_round_trip(family, tmp_path):
    adapted = kpeft.adapt(tiny_model(family), method="kernel_mix_qvo" if family != "t5" else "lora",
                          budget="intermediate" if family != "t5" else "small")
    randomise(adapted)
    batch = inputs(family)
    expected = output(adapted, batch)  # the adapted model is called like the transformers model
    adapted.save_adapter(tmp_path / "a")
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"adapter.safetensors", "kpeft_adapter.yaml"}
    restored = kpeft.load_adapter(tiny_model(family), tmp_path / "a")
    torch.testing.assert_close(output(restored.model, batch), expected, rtol=0, atol=0)
    restored.merge()
    torch.testing.assert_close(output(restored.model, batch), expected, rtol=1e-5, atol=1e-5)
    restored.unmerge()
    with pytest.raises(KpeftError, match=f"was trained on a {family} model, not "):
        kpeft.load_adapter(tiny_model("llama" if family == "gpt2" else "gpt2"), tmp_path / "a")


# ---------------------------------------------------------------- export from the API (fast matrix)
EXPORTS = [  # (family, method, budget, overrides, peft too)
    ("gpt2", "lora", "small", {}, True),
    ("gpt2", "kernel_mix_qvo", "intermediate", {}, True),
    ("gpt2", "kernel_mix_lite_qv", "small", {}, True),
    ("gpt2", "krona", "nlu", {"a_shape": [4, 4]}, False),  # fused c_attn: no LoKr
    ("llama", "lora", "small", {}, True),
    ("llama", "kernel_mix_qvo", "intermediate", {}, True),
    ("llama", "krona", "nlu", {"a_shape": [4, 4]}, True),  # square A: PEFT LoKr
    ("t5", "lora", "small", {}, True),
]


@pytest.mark.parametrize(("family", "method", "budget", "overrides", "peft"), EXPORTS,
                         ids=[f"{e[0]}-{e[1]}" for e in EXPORTS])
def test_export_gives_kpeft_logits(family, method, budget, overrides, peft, tmp_path):
    adapted = kpeft.adapt(tiny_model(family), method=method, budget=budget, **overrides)
    randomise(adapted)
    batch = inputs(family)
    expected = output(adapted.model, batch)
    auto = AutoModelForSeq2SeqLM if family == "t5" else AutoModelForCausalLM
    export_merged(adapted, tmp_path / "merged")
    assert not adapted.merged  # the kpeft model is left as it was
    torch.testing.assert_close(output(auto.from_pretrained(tmp_path / "merged").eval(), batch), expected,
                               rtol=1e-5, atol=1e-5)
    if not peft:
        with pytest.raises(KpeftError, match="PEFT's LoKr has no GPT-2 fused c_attn") as err:
            export_peft(adapted, tmp_path / "peft")
        assert "\n" not in str(err.value)
        return
    export_peft(adapted, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == ("LOKR" if method == "krona" else "LORA")
    assert config["base_model_name_or_path"] == str((tmp_path / "peft" / "base").resolve())
    assert config.get("fan_in_fan_out", False) == (family == "gpt2")
    base = auto.from_pretrained(tmp_path / "peft" / "base").eval()
    loaded = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    torch.testing.assert_close(output(loaded, batch), expected, rtol=1e-5, atol=1e-5)


def test_kernel_mix_peft_rank_is_heads_times_r_plus_shared(tmp_path):
    adapted = kpeft.adapt(tiny_model("gpt2"), method="kernel_mix_qvo", budget="intermediate")
    randomise(adapted)
    export_peft(adapted, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    km = adapted.method_cfg.components.kernel_mix
    qv = 4 * km.q.wise + km.q.shared + 4 * km.v.wise + km.v.shared  # fused c_attn: q and v stacked
    o = 4 * km.o.wise + km.o.shared
    ranks = {m: config["rank_pattern"].get(re.escape(m), config["r"]) for m in config["target_modules"]}
    assert ranks == {f"transformer.h.{i}.attn.{n}": r for i in range(2) for n, r in (("c_attn", qv), ("c_proj", o))}
    assert config["lora_bias"] is True  # GPT-2 has biases: the head-specific β is trained


def test_krona_with_a_non_square_factor_is_refused_for_peft(tmp_path):
    adapted = kpeft.adapt(tiny_model("llama"), method="krona", budget="nlu", a_shape=[4, 8])
    with pytest.raises(KpeftError, match=r"LoKr's w1 is \(f, f\).*KronA's A is \(4, 8\)") as err:
        export_peft(adapted, tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("family", "method", "budget", "why"), [
    ("gpt2", "prefix", "small", "PrefixTuning component acts at the attention site"),
    ("gpt2", "adapter", "small", "acts at the block site"),
    ("llama", "bitfit", "small", "adds tensors a plain LlamaForCausalLM does not have"),
])
def test_unmergeable_methods_are_refused_in_one_line(family, method, budget, why, tmp_path):
    adapted = kpeft.adapt(tiny_model(family), method=method, budget=budget)
    with pytest.raises(KpeftError, match=why) as err:
        export_merged(adapted, tmp_path)
    assert "\n" not in str(err.value) and not (tmp_path / "config.json").exists()


# ---------------------------------------------------------------- runs through the CLI
@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])
def test_generate_reproduces_the_runs_evaluation(model, nlg_run, tmp_path):
    run_dir = nlg_run(model, "kernel_mix_qvo" if model == "tiny_gpt2" else "lora")
    evaluated = [json.loads(x)["prediction"] for x in (run_dir / "generations" / "test.jsonl").read_text().splitlines()]
    # the tiny GPT-2 run has learnt to write something; the tiny Llama one still stops at once
    assert len(evaluated) == 5 and (any(evaluated) or model == "tiny_llama")
    out = cli("kpeft.generate", run_dir, "--split", "test", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in out.stdout.splitlines()]
    assert [r["prediction"] for r in rows] == evaluated and [r["id"] for r in rows] == [str(i) for i in range(1, 6)]
    # the same test entries as raw input lines (linearised triple sets), in two batches of 2 + 1
    lines = [f"{s} | {p} | {o}" for s, p, o, _ in TRIPLES[:5]]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    out = cli("kpeft.generate", run_dir, "--input", tmp_path / "in.txt", "--out", tmp_path / "out.txt")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out.txt").read_text().splitlines() == [" ".join(p.splitlines()) for p in evaluated]


def test_generate_refusals_are_one_line(nlg_run, tmp_path):
    run_dir = nlg_run("tiny_gpt2", "kernel_mix_qvo")
    (tmp_path / "bad.txt").write_text("Alan_Bean occupation Test_pilot\n")
    for args, msg in (((run_dir, "--split", "test", "--num-beams", "0"), "--num-beams must be >= 1"),
                      ((run_dir, "--input", tmp_path / "bad.txt"), "input line 1 is not a webnlg input"),
                      ((tmp_path, "--split", "test"), "is not a kpeft run directory")):
        out = cli("kpeft.generate", *args)
        assert out.returncode == 2 and msg in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_generate_with_beams_equals_the_beam_decoder(nlg_run, tmp_path):
    """``--num-beams 3`` decodes the run's test split with kpeft's beam search (docs/decoding.md)."""
    from kpeft.generate import generate

    run_dir = nlg_run("tiny_gpt2", "kernel_mix_qvo")
    out = cli("kpeft.generate", run_dir, "--split", "test", "--num-beams", "3", "--out", tmp_path / "beam.txt")
    assert out.returncode == 0, out.stderr
    run = kpeft.load_run(run_dir)
    records = run.task._cap(run.task.generation_records("test"), "test")
    expected = generate(run, records, num_beams=3)
    assert run.task.decoding.num_beams == 3
    assert (tmp_path / "beam.txt").read_text().splitlines() == [" ".join(p.splitlines()) for p in expected]


@pytest.mark.parametrize(("model", "method"), [("tiny_gpt2", "kernel_mix_qvo"), ("tiny_llama", "lora")])
def test_export_a_run_merged_and_peft(model, method, nlg_run, tmp_path):
    run_dir = nlg_run(model, method)
    run = kpeft.load_run(run_dir)
    batch = nlg_batch(run)
    with torch.no_grad():
        expected = run.model(**batch).logits
    for fmt in ("merged", "peft"):
        out = cli("kpeft.export", run_dir, "--format", fmt, "--out", tmp_path / fmt)
        assert out.returncode == 0, out.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert len(tokenizer) == len(run.tokenizer) == merged.get_input_embeddings().weight.shape[0]
    marker = run.tokenizer.convert_tokens_to_ids("<target_webnlg>")
    assert marker >= 256 and tokenizer.convert_tokens_to_ids("<target_webnlg>") == marker
    assert tokenizer.tokenize("<target_webnlg>") == ["<target_webnlg>"]  # one special token, not bytes
    torch.testing.assert_close(plain_logits(merged, batch), expected, rtol=1e-5, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base").eval()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    torch.testing.assert_close(plain_logits(peft_model, batch), expected, rtol=1e-5, atol=1e-5)
    note = json.loads((tmp_path / "merged" / "kpeft_export.json").read_text())
    assert note["method"] == method and "token_type_ids" in note["task_embeddings"]


def test_export_refusal_from_the_cli_is_one_line(nlg_run, assets, tmp_path):
    tok, data = assets
    run_dir, _, _ = train_cli(
        "model=tiny_gpt2", f"model.tokenizer={tok}", "task=webnlg", f"task.data_dir={data}", "task.options.meteor=off",
        "task.options.max_new_tokens=2", "task.options.max_eval_examples=1", "method=prefix", "budget=small",
        "train.batch_size=6", "train.epochs=1", "train.warmup_steps=0", root=tmp_path / "runs", threads=1)
    out = cli("kpeft.export", run_dir, "--format", "merged", "--out", tmp_path / "x")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "cannot export prefix merged" in out.stderr


# ---------------------------------------------------------------- the documented example runs
def test_docs_api_example_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", (DOCS / "api.md").read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/api.md", "exec"), {})


@pytest.mark.parametrize(("task", "line", "marker"), [
    ("webnlg", "Aarhus | country | Denmark ; Aarhus | leader | Jacob_Bundsgaard", "<target_webnlg>"),
    ("e2e", "name[The Eagle], eatType[coffee shop], food[French]", "<target_e2e>"),
    ("cnndm", "The cat sat on the mat all day long .", "<target_sm>"),
    ("coqa", "Anna has a red bike .\tWho has a bike?\tAnna\tWhat colour is it?", "<answer>"),
])
def test_generate_input_lines_become_the_tasks_prompts(task, line, marker, assets, make_cfg):
    from kpeft.backbones.loading import load_tokenizer
    from kpeft.generate import parse_inputs
    from kpeft.tasks import task_class

    cfg = make_cfg("model=tiny_gpt2", f"model.tokenizer={assets[0]}", f"task={task}")
    encoder = task_class(cfg.task)(cfg.task, load_tokenizer(cfg.model))
    (record,) = parse_inputs(task, [line])
    ids, types = encoder.prompt(record)
    assert ids[-1] == types[-1] == encoder.sid(marker) and len(ids) == len(types) > 10
    with pytest.raises(KpeftError, match=f"^input line 2 is not a {task} input"):
        parse_inputs(task, [line, "[1, 2" if task == "webnlg" else ("no brackets here" if task == "e2e" else "{bad")])
