"""One schema per config section: the ml_collections sections and the dataclasses that read them have the
same fields and defaults; list fields are tuples, and comma lists from the command line mean the same."""
import dataclasses
import subprocess
import sys

import pytest

from configs.base import get_config
from data_pipeline import DataConfig
from data_pipeline.schema import field_defaults, from_mapping, parse_list
from iopo_jax.objectives import ObjectiveConfig
from procs import REPO, cli_env

SECTIONS = {"data": DataConfig, "objective": ObjectiveConfig}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_section_and_dataclass_have_the_same_fields_and_defaults(section):
    cls, values = SECTIONS[section], get_config()[section].to_dict()
    assert sorted(values) == sorted(f.name for f in dataclasses.fields(cls))
    assert values == field_defaults(cls)  # DataConfig normalises lists to tuples: the config holds tuples too
    assert from_mapping(cls, get_config()[section], section) == cls()


def test_unknown_field_names_the_section_and_the_field():
    with pytest.raises(ValueError, match=r"config\.data does not match DataConfig: unknown fields: cutof_len"):
        DataConfig.from_mapping({"cutof_len": 10})
    with pytest.raises(ValueError, match=r"config\.objective does not match ObjectiveConfig: unknown fields: betta"):
        ObjectiveConfig.from_mapping({"betta": 0.2})
    with pytest.raises(ValueError, match="is not one of"):
        ObjectiveConfig.from_mapping({"reference": "offline"})


def test_list_fields_are_tuples_and_comma_strings_mean_the_same():
    c = get_config()
    for v in (c.model.lora_targets, c.data.train_files, c.data.val_files, c.data.buckets, c.optimizer.freeze_patterns):
        assert isinstance(v, tuple)
    assert parse_list("q_proj, v_proj") == parse_list(("q_proj,v_proj",)) == ("q_proj", "v_proj")
    assert parse_list((512, 1024), int) == parse_list("512,1024", int) == (512, 1024)
    assert parse_list("") == parse_list(None) == parse_list(()) == ()
    with pytest.raises(ValueError, match=r"config\.data\.buckets='a': not a list of int"):
        parse_list("a", int, name="config.data.buckets")
    assert DataConfig(train_files="a.json,b.json", buckets="64,128").train_files == ("a.json", "b.json")


def test_generate_flags_are_the_fields_of_generate_args():
    from absl import flags

    from iopo_jax.sampling.generate import GenerateArgs, _define_flags, args_from_flags

    fv = flags.FlagValues()
    _define_flags(fv)
    defaults = field_defaults(GenerateArgs)
    for f in dataclasses.fields(GenerateArgs):
        default = fv[f.name].default
        assert (tuple(default) if isinstance(default, list) else default) == defaults.get(f.name), f.name
    assert set(fv) - {f.name for f in dataclasses.fields(GenerateArgs)} == {"compilation_cache_dir"}
    fv(["generate", "--model_dir=m", "--input=i", "--output=o", "--stop_token_ids=5,7", "--stop=a", "--stop=b"])
    args = args_from_flags(fv)
    assert args == GenerateArgs(model_dir="m", input="i", output="o", stop=["a", "b"], stop_token_ids=(5, 7))
    fv["stop_token_ids"].parse("x")
    with pytest.raises(ValueError, match="--stop_token_ids"):
        args_from_flags(fv)


_PRINT = """
from absl import app
from ml_collections import config_flags
CONFIG = config_flags.DEFINE_config_file("config")
def main(_):
    from data_pipeline import DataConfig
    from data_pipeline.schema import parse_list
    c = CONFIG.value
    print(repr(parse_list(c.model.lora_targets)), repr(DataConfig.from_mapping(c.data).buckets),
          repr(DataConfig.from_mapping(c.data).train_files))
app.run(main)
"""


@pytest.mark.parametrize("args, expected", [
    (["--config.model.lora_targets=q_proj,v_proj", "--config.data.buckets=64,128",
      "--config.data.train_files=a.json,b.json"], "('q_proj', 'v_proj') (64, 128) ('a.json', 'b.json')"),
    (["--config.model.lora_targets=all", "--config.data.buckets=(256,)", "--config.data.train_files=a.json"],
     "('all',) (256,) ('a.json',)"),
    (["--config.model.lora_targets=('q_proj', 'o_proj')", "--config.data.buckets=512"],
     "('q_proj', 'o_proj') (512,) ()"),
])
def test_command_line_list_overrides(args, expected):
    out = subprocess.run([sys.executable, "-c", _PRINT, "--config=configs/base.py", *args], cwd=REPO,
                         env=cli_env(None), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == expected


def test_rl_judge_and_weights_sections_match_their_dataclasses():
    """config.rl.judge holds every ClientConfig field (plus the judge reward's own settings) and
    config.rl.weights exactly RewardWeights' fields: a field added to either side without the other fails."""
    from configs.rl_base import get_config as rl_config
    from iopo_jax.chat_client import ClientConfig
    from iopo_jax.rl.advantages import RewardWeights
    from iopo_jax.rl.loop import weights_of
    from iopo_jax.rl.rewards import JUDGE_SETTINGS

    c = rl_config()
    j = c.rl.judge
    cc = ClientConfig.from_mapping(j, section="config.rl.judge", ignore=JUDGE_SETTINGS + ("cache_path",),
                                   store_path="s.jsonl", name="judge reward")
    assert (cc.model, cc.top_p, cc.concurrency, cc.api_key_env) == (j.model, j.top_p, j.concurrency, j.api_key_env)
    assert weights_of(c.rl) == RewardWeights()
    c.rl.weights.ilaa = 2.0
    with pytest.raises(ValueError, match=r"config\.rl\.weights does not match RewardWeights: unknown fields: ilaa"):
        weights_of(c.rl)
    del j["top_p"]
    with pytest.raises(ValueError, match=r"config\.rl\.judge does not match ClientConfig: missing fields: top_p"):
        ClientConfig.from_mapping(j, section="config.rl.judge", ignore=JUDGE_SETTINGS + ("cache_path",),
                                  store_path="s.jsonl", name="judge reward")


def test_model_section_is_lora_config_and_model_config_overrides_field_for_field():
    """config.model: lora_* are LoRAConfig's fields (same defaults), the other keys are ModelConfig fields or
    settings of the run; a key of neither kind, or a LoRA field missing, fails naming it."""
    from iopo_jax.models.config import LORA_TARGETS_ALL, LoRAConfig, ModelConfig
    from iopo_jax.train_loop import MODEL_SETTINGS, lora_config, model_overrides

    c = get_config()
    lora = {k[len("lora_"):]: v for k, v in c.model.items() if k.startswith("lora_")}
    assert lora == field_defaults(LoRAConfig) and lora_config(c) == LoRAConfig()
    over = model_overrides(c)
    assert over.pop("lora") == LoRAConfig()
    assert over == {k: c.model[k] for k in c.model.keys() if k not in MODEL_SETTINGS and not k.startswith("lora_")}
    assert set(over) <= {f.name for f in dataclasses.fields(ModelConfig)}
    c.model.lora_targets, c.model.lora_rank = ("q_proj, v_proj",), 4  # a comma list from the command line
    assert lora_config(c) == LoRAConfig(rank=4, targets=("q_proj", "v_proj"))
    c.model.lora_targets = ("all",)
    assert lora_config(c).targets == LORA_TARGETS_ALL
    c.model.finetune = "full"
    assert lora_config(c) is None and model_overrides(c)["lora"] is None
    c = get_config()
    c.model.lora_rnak = 4
    with pytest.raises(ValueError, match=r"config\.model\.lora_\* does not match LoRAConfig: unknown fields: lora_rn"):
        lora_config(c)
    del c.model["lora_rnak"], c.model["lora_dropout"]
    with pytest.raises(ValueError, match="missing fields: lora_dropout"):
        lora_config(c)
    c = get_config()
    c.model.remmat = "full"
    with pytest.raises(ValueError, match=r"config\.model does not match ModelConfig: unknown fields: remmat"):
        model_overrides(c)


def test_from_hf_checks_overrides_and_required_fields():
    from iopo_jax.models.config import ModelConfig
    from iopo_jax.tools.make_tiny_model import tiny_config

    cfg = tiny_config()
    hf = cfg.to_hf()
    assert ModelConfig.from_hf(hf, param_dtype=cfg.param_dtype) == cfg
    assert ModelConfig.from_hf(hf, remat="full", param_dtype=cfg.param_dtype) == cfg.replace(remat="full")
    with pytest.raises(ValueError, match="HF config with overrides does not match ModelConfig: unknown fields: remm"):
        ModelConfig.from_hf(hf, remmat="full")
    del hf["num_hidden_layers"]
    with pytest.raises(ValueError, match="missing field.*num_hidden_layers"):
        ModelConfig.from_hf(hf)


def test_generation_section_is_the_api_client_config():
    """config.generation: the ClientConfig fields it holds go to the api backend's client as they are."""
    from configs.eval_trace import get_config as eval_config
    from evaluation.generate import GENERATION_SETTINGS, api_client_config
    from iopo_jax.chat_client import ClientConfig

    c = eval_config()
    cc = api_client_config(c, "/w")
    shared = set(c.generation.keys()) - set(GENERATION_SETTINGS)
    assert shared <= {f.name for f in dataclasses.fields(ClientConfig)}
    assert {k: getattr(cc, k) for k in shared} == {k: c.generation[k] for k in shared}
    assert (cc.max_tokens, cc.store_path, cc.name) == (c.generation.max_new_tokens, "/w/generation_cache.jsonl",
                                                       "generation")
    c.generation.top_k = 5
    with pytest.raises(ValueError, match=r"config\.generation does not match ClientConfig: unknown fields: top_k"):
        api_client_config(c, "/w")
