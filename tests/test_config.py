"""Configuration: every YAML under conf/ composes through the typed schemas, and composition
problems are one-line KpeftErrors that name the key or list the valid choices."""

from __future__ import annotations

import itertools
import re

import pytest
from omegaconf import OmegaConf

from kpeft.backbones import HEADS_OF_FAMILY, describe
from kpeft.backbones.loading import load_model
from kpeft.compose import available, check_choices, compose
from kpeft.config import CONF_DIR, BudgetConfig, MethodConfig, ModelConfig, TaskConfig
from kpeft.errors import KpeftError
from kpeft.methods.lowrank import LoRAConfig

MODELS, METHODS, ALL_BUDGETS, TASKS = (available(g) for g in ("model", "method", "budget", "task"))
# budget=match solves sizes for a target count (tests/test_budget_match.py); the others are tables of sizes.
BUDGETS = [b for b in ALL_BUDGETS if b != "match"]


def test_the_groups_hold_the_expected_files():
    assert {"gpt2", "roberta_base", "t5_base", "minilm_l6", "smollm2_135m"} <= set(MODELS)
    assert {f"tiny_{f}" for f in ("gpt2", "bert", "roberta", "t5", "llama")} <= set(MODELS)
    assert {"lora", "bitfit", "finetune"} <= set(METHODS)
    assert {"tiny", "small", "intermediate", "nlu", "t5_glue"} <= set(BUDGETS)
    assert TASKS and all((CONF_DIR / "task" / f"{t}.yaml").exists() for t in TASKS)


def test_the_default_config_composes_and_resolves():
    cfg = compose([])
    assert OmegaConf.get_type(cfg).__name__ == "Config"
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert resolved["run_dir"].endswith(f"/{cfg.method.name}-{cfg.budget.name}/seed{cfg.seed}")


@pytest.mark.parametrize("name", MODELS)
def test_every_model_yaml_composes_and_builds_on_meta(name):
    cfg = compose([f"model={name}"])
    assert OmegaConf.get_type(cfg.model) is ModelConfig
    assert cfg.model.name == name  # the file's `name` is its file name (run directories use it)
    # The architecture numbers build the family it claims (no weights, no network).
    model = load_model(cfg.model, HEADS_OF_FAMILY[cfg.model.family][0], meta=True)
    anatomy = describe(model)
    assert anatomy.family == cfg.model.family
    arch = cfg.model.architecture
    n_layers = arch.get("n_layer") or arch.get("num_hidden_layers") or arch.get("num_layers")
    expected = n_layers + arch.get("num_decoder_layers", 0)
    assert len(anatomy.layers) == expected


@pytest.mark.parametrize("name", METHODS)
def test_every_method_yaml_composes(name):
    # With the default budget, or the first budget that sizes the method (KronA: t5_glue only).
    budget = compose([]).budget.name
    if not _fits(name, budget):
        budget = next(b for b in BUDGETS if _fits(name, b))
    cfg = compose([f"method={name}", f"budget={budget}"])
    assert OmegaConf.get_type(cfg.method) is MethodConfig
    assert cfg.method.name == name
    assert cfg.method.components or name == "zero_shot", "a method (but zero_shot) has at least one component"
    for comp_name, comp in cfg.method.components.items():
        assert comp.kind, f"components.{comp_name} has no kind"


@pytest.mark.parametrize("name", BUDGETS)
def test_every_budget_yaml_composes(name):
    cfg = compose(["method=lora", f"budget={name}"])  # every budget sizes LoRA
    assert OmegaConf.get_type(cfg.budget) is BudgetConfig
    assert cfg.budget.name == name
    assert cfg.budget.paper_pct is None or 0 < cfg.budget.paper_pct < 100


@pytest.mark.parametrize("name", TASKS)
def test_every_task_yaml_composes(name):
    cfg = compose([f"task={name}"])
    assert OmegaConf.get_type(cfg.task) is TaskConfig
    assert cfg.task.name == name
    assert cfg.task.kind in ("classification", "causal_lm", "seq2seq")
    assert (cfg.task.num_labels >= 1) == (cfg.task.kind == "classification")  # 1 = regression (STS-B)


def _fits(method: str, budget: str) -> bool:
    """Whether the budget YAML sizes every ${budget.<section>...} the method YAML uses."""
    text = (CONF_DIR / "method" / f"{method}.yaml").read_text()
    sections = {s.split(".")[0] for s in _interpolated_budget_keys(text)}
    budget_yaml = OmegaConf.load(CONF_DIR / "budget" / f"{budget}.yaml")
    return all(s in budget_yaml for s in sections)


def _interpolated_budget_keys(text: str) -> list[str]:
    return re.findall(r"\$\{budget\.([\w.]+)\}", text)


@pytest.mark.parametrize(("method", "budget"), list(itertools.product(METHODS, BUDGETS)))
def test_every_method_budget_pair_composes_and_resolves(method, budget):
    if not _fits(method, budget):
        with pytest.raises(KpeftError, match=f"method '{method}' cannot meet budget '{budget}'"):
            compose([f"method={method}", f"budget={budget}"])
        pytest.skip(f"{method} has no size in budget {budget} (error checked)")
    cfg = compose([f"method={method}", f"budget={budget}"])
    resolved = OmegaConf.to_container(cfg.method, resolve=True, throw_on_missing=True)
    if method == "lora":
        assert resolved["components"]["lora"]["r"] == OmegaConf.load(CONF_DIR / "budget" / f"{budget}.yaml").lora.r


HOME_BUDGETS = {"compacter": "t5_glue", "krona": "t5_glue", "krona_b": "t5_glue", "krona_b_res": "t5_glue",
                "kernel_wise_lite_qv": "small", "kernel_mix_lite_qv": "small", "prompt_tuning": "small"}


@pytest.mark.parametrize("method", METHODS)
def test_without_budget_every_method_runs_at_intermediate_or_its_home_budget(method):
    """The root default is `intermediate`; a method it does not size names the budget it was
    published at; an explicit budget= and an experiment preset's budget still win."""
    assert compose([f"method={method}"]).budget.name == HOME_BUDGETS.get(method, "intermediate")
    if _fits(method, "tiny"):
        assert compose([f"method={method}", "budget=tiny"]).budget.name == "tiny"
    if _fits(method, "nlu"):
        assert compose(["experiment=nlu_mini", f"method={method}"]).budget.name == "nlu"


def test_lora_yaml_values_reach_the_typed_component():
    cfg = compose(["method=lora", "budget=intermediate"])
    lora = cfg.method.components.lora
    assert OmegaConf.get_type(lora) is LoRAConfig
    assert list(lora.targets) == ["q", "v"]
    assert (lora.r, lora.alpha, lora.dropout, lora.init) == (54, 32.0, 0.1, "kaiming_zero")


def test_train_layernorm_is_one_key_of_the_method_set_by_the_budget():
    cfg = compose(["model=t5_base", "method=krona", "budget=t5_glue"])
    assert cfg.method.train_layernorm is True and "train_layernorm" not in cfg.method.components.krona
    assert compose(["method=krona", "budget=t5_glue", "budget.krona.train_layernorm=false"]).method.train_layernorm is False
    assert compose(["method=lora", "budget=small", "method.train_layernorm=true"]).method.train_layernorm is True


def test_a_saved_component_train_layernorm_is_read_as_the_methods():
    """Configs saved when every component had its own ``train_layernorm`` (records, checkpoints)."""
    from kpeft.api import typed_method

    saved = {"name": "krona", "components": {"krona": {"kind": "krona", "a_shape": [32, 24], "b_shape": [24, 32],
                                                        "train_layernorm": True}}}
    method = typed_method(saved)
    assert method.train_layernorm is True and "train_layernorm" not in method.components.krona
    assert "train_layernorm" in saved["components"]["krona"]  # the caller's dict is left as it was


@pytest.mark.parametrize("override", ["method.components.lora.train_layernorm=true",
                                      "+method.components.lora.train_layernorm=true"])
def test_a_component_train_layernorm_names_the_method_key(override):
    with pytest.raises(KpeftError, match=r"unknown key 'method.components.lora.train_layernorm'.*"
                                         r"method.train_layernorm=true\|false"):
        compose(["method=lora", "budget=small", override])


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "override",
    ["method.components.lora.rr=3", "+method.components.lora.rr=3"],
)
def test_a_misspelt_key_names_the_key_and_the_valid_fields(override):
    with pytest.raises(KpeftError) as info:
        compose(["method=lora", "budget=small", override])
    msg = str(info.value)
    assert "method.components.lora.rr" in msg
    assert "unknown key" in msg and "alpha" in msg and "targets" in msg  # the schema's fields
    assert "\n" not in msg


def test_a_misspelt_top_level_key_is_an_error():
    with pytest.raises(KpeftError, match=r"unknown key 'trian'"):
        compose(["trian.lr=1"])


@pytest.mark.parametrize(
    ("override", "key", "why"),
    [
        ("method.components.lora.alpha=abc", "method.components.lora.alpha", "Float"),
        ("method.components.lora.r=abc", "method.components.lora.r", "Integer"),
        ("budget.lora.r=abc", "budget.lora.r", "Integer"),
        ("method.components.lora.targets=q", "method.components.lora.targets", "ListConfig"),
    ],
)
def test_a_wrong_type_names_the_key_and_the_reason(override, key, why):
    with pytest.raises(KpeftError) as info:
        compose(["method=lora", "budget=small", override])
    msg = str(info.value)
    assert key in msg and why in msg
    assert "\n" not in msg


@pytest.mark.parametrize("group", ["model", "method", "budget", "task"])
def test_an_unknown_name_lists_the_valid_names(group):
    valid = available(group)
    expected = f"unknown {group} 'nope'; valid: {', '.join(valid)}"
    with pytest.raises(KpeftError) as info:
        check_choices([f"{group}=nope"])
    assert str(info.value) == expected
    with pytest.raises(KpeftError) as info:
        compose([f"{group}=nope"])
    assert str(info.value) == expected


def test_check_choices_checks_every_name_of_a_sweep():
    check_choices(["method=lora,bitfit", "budget=small,tiny", "seed=1,2", "model.init=random"])
    with pytest.raises(KpeftError, match=r"unknown method 'nope'"):
        check_choices(["method=lora,nope"])


def test_a_method_that_cannot_meet_a_budget_says_which_budgets_can():
    # A budget without a LoRA size (the schema leaves it ??? when a budget YAML omits it).
    with pytest.raises(KpeftError) as info:
        compose(["method=lora", "budget=small", "budget.lora.r=???"])
    msg = str(info.value)
    sizing = [b for b in ALL_BUDGETS if b != "small"]
    assert msg == (
        f"method 'lora' cannot meet budget 'small': it gives no lora size; budgets that do: {', '.join(sizing)}"
    )
    # Methods that need no size are fine with that budget.
    assert compose(["method=bitfit", "budget=small", "budget.lora.r=???"]).method.name == "bitfit"


def test_a_missing_method_value_says_to_set_it():
    with pytest.raises(KpeftError, match=r"missing value method\.components\.lora\.r; set it"):
        compose(["method=lora", "budget=small", "method.components.lora.r=???"])


def test_method_train_overrides_reach_only_their_method():
    """An experiment's per-method hyper-parameters (method_train) are merged into `train`."""
    over = ["+method_train.bitfit.lr=0.005", "+method_train.lora.epochs=7", "budget=nlu"]
    bitfit = compose(["method=bitfit", *over])
    lora = compose(["method=lora", *over])
    default_lr = compose(["method=lora"]).train.lr
    assert lora.train.epochs == 7 and lora.train.lr == default_lr
    assert bitfit.train.lr == 0.005


def test_method_train_with_an_unknown_train_key_names_it():
    with pytest.raises(KpeftError, match="method_train.lora.*lrr"):
        compose(["method=lora", "+method_train.lora.lrr=1"])


def test_nlu_mini_preset_composes_with_its_per_method_learning_rates():
    cfg = compose(["experiment=nlu_mini", "method=bitfit"])
    assert (cfg.model.name, cfg.task.name, cfg.budget.name) == ("minilm_l6", "glue_sst2", "nlu")
    assert cfg.train.lr == 5e-3 and cfg.task.options.train_file == "train_subset_2000.tsv"
    assert compose(["experiment=nlu_mini", "method=finetune"]).train.lr == 5e-5


# ---------------------------------------------------------------- components own their schemas
def test_every_component_kind_registers_its_schema_next_to_its_builder():
    import ast

    from kpeft.methods.registry import BUDGET_SIZES, BUILDERS, SCHEMAS

    assert set(SCHEMAS) == set(BUILDERS) and {"lora", "kernel_mix", "krona", "prefix"} <= set(SCHEMAS)
    for kind, schema in SCHEMAS.items():
        assert schema.kind == kind and schema.__module__ == BUILDERS[kind].__module__
    assert {"lora", "kernel_mix_qvo", "krona", "inducer_lora", "said"} <= set(BUDGET_SIZES)
    assert all((CONF_DIR / "method" / f"{m}.yaml").is_file() for m in BUDGET_SIZES)  # a section per method
    source = (CONF_DIR.parent / "kpeft" / "config.py").read_text()
    classes = {n.name for n in ast.parse(source).body if isinstance(n, ast.ClassDef)}
    assert classes == {"ModelConfig", "MethodConfig", "BudgetBase", "TaskConfig", "TrainConfig", "DecodeConfig",
                       "LoggerConfig", "Config"}
    assert len(source.splitlines()) <= 250


def test_a_budget_section_is_typed_by_the_method_module():
    with pytest.raises(Exception, match="budget.lora.rr"):
        compose(["method=lora", "+budget.lora.rr=3"])
    cfg = compose(["method=kernel_mix_qvo", "budget=intermediate"])
    assert type(cfg.budget.kernel_mix_qvo.q_wise) is int and cfg.budget.kernel_mix_qvo.q_wise > 0
