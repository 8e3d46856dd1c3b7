"""Published recipes (--recipe NAME): the README table is what the code gives, every recipe resolves
through hvp_run.parse_config to its values (command-line flags still win, no CPU preset under a recipe),
and the named published runs have exactly the values their sources document (the specification is
written out below, independently of the RECIPES dicts)."""
import dataclasses
import importlib.util
import inspect
import json

import pytest

import hvp_run
from conftest import REPO, run_script

_spec = importlib.util.spec_from_file_location("recipes_table", REPO / "tools" / "recipes_table.py")
recipes_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipes_table)

SCRIPTS = recipes_table.SCRIPTS
MODULES = {script: recipes_table.load_script(script) for script in SCRIPTS}
ALL_RECIPES = [(script, name) for script in SCRIPTS for name in MODULES[script].RECIPES]


def resolve(script, argv):
    module = MODULES[script]
    return hvp_run.parse_config(module.Config, argv, presets=module.PRESETS, recipes=module.RECIPES)


def shown(value):
    """How a start-up note writes a value (tuples as their command-line form)."""
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def note_values(note, name):
    """{key: value text} of a start-up note "recipe NAME: k=v, k=v"."""
    prefix = f"recipe {name}: "
    assert note.startswith(prefix), note
    return dict(item.split("=", 1) for item in note[len(prefix):].split(", ")) if note != prefix else {}


# ----------------------------------------------------------------------------------- the README table

def test_the_readme_table_is_what_the_code_generates():
    block = recipes_table.readme_block(recipes_table.README.read_text())
    assert block is not None, "README.md has no recipes:start/recipes:end block"
    assert block == recipes_table.render(), "README.md is out of date: run `python tools/recipes_table.py`"


def test_the_table_has_one_row_per_recipe_with_its_flags_and_its_source_comment():
    rows = recipes_table.recipe_rows()
    assert [(script, name) for script, name, _, _ in rows] == ALL_RECIPES
    for script, name, flags, comment in rows:
        assert comment, f"{script}: recipe {name} has no comment above it naming its source"
        assert len(flags) == len(MODULES[script].RECIPES[name])
    by_name = {name: (flags, comment) for _, name, flags, comment in rows}
    flags, comment = by_name["dino_vits16_800ep"]
    assert "--no-norm_last_layer" in flags and "--global_scale 0.25 1.0" in flags and "--lr 0.0005" in flags
    assert comment.startswith("DINO ViT-S/16, 800 epochs (args.txt of dino_deitsmall16_pretrain)")
    assert "--shared_head" in by_name["ibot_vits16_800ep"][0] and "--pred_ratio 0.0 0.3" in by_name["ibot_vits16_800ep"][0]


def test_check_fails_on_a_stale_table_and_a_rewrite_fixes_only_the_block(tmp_path, capsys):
    readme = tmp_path / "README.md"
    before, after = "# title\n\ntext before\n\n", "\n\ntext after\n"
    readme.write_text(before + recipes_table.render().replace("`--lr 0.0005`", "`--lr 0.001`", 1) + after)
    assert recipes_table.main(["--check", "--readme", str(readme)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert recipes_table.main(["--readme", str(readme)]) == 0
    assert readme.read_text() == before + recipes_table.render() + after
    assert recipes_table.main(["--check", "--readme", str(readme)]) == 0
    readme.write_text("no markers\n")
    assert recipes_table.main(["--check", "--readme", str(readme)]) == 2


def test_source_comments_are_the_whole_line_comments_directly_above_each_key(tmp_path):
    script = tmp_path / "train_x.py"
    script.write_text(
        "RECIPES = {\n"
        "    # first line\n"
        "    #   second line\n"
        "    \"a\": dict(lr=1.0),  # trailing, not a source\n"
        "    \"b\": dict(lr=2.0),\n"
        "\n"
        "    # only c's\n"
        "    \"c\": dict(\n"
        "        lr=3.0),  # neither\n"
        "}\n")
    assert recipes_table.recipe_comments(script) == {"a": "first line second line", "b": "", "c": "only c's"}


# ----------------------------------------------------------------------------------- parse_config

@pytest.mark.parametrize("script,name", ALL_RECIPES)
def test_a_recipe_resolves_to_its_values_and_nothing_from_the_cpu_preset(script, name):
    module = MODULES[script]
    recipe = module.RECIPES[name]
    fields = {f.name: f for f in dataclasses.fields(module.Config)}
    assert set(recipe) <= set(fields), f"not Config fields: {set(recipe) - set(fields)}"
    for key, value in recipe.items():  # the field's type (an int is a fine float), tuples of the right length
        default = fields[key].default
        assert isinstance(value, type(default)) or (type(default) is float and type(value) is int), (key, value)
        if isinstance(default, tuple) and len(default) > 1:
            assert len(value) == len(default), key
    cfg, notes = resolve(script, ["--recipe", name])  # --dataset: the shipped one, which has a CPU preset
    assert cfg.recipe == name
    for key, value in recipe.items():
        assert getattr(cfg, key) == value, key
    for key, field in fields.items():  # every other flag keeps its default: the preset was not applied
        if key not in recipe and key not in ("recipe", "dataset"):
            assert getattr(cfg, key) == field.default, key
    assert notes == [f"recipe {name}: " + ", ".join(f"{k}={shown(v)}" for k, v in recipe.items())]
    module.check_config(cfg)  # a recipe is a valid configuration


@pytest.mark.parametrize("script,name", ALL_RECIPES)
def test_command_line_flags_win_over_the_recipe(script, name):
    module = MODULES[script]
    recipe = module.RECIPES[name]
    fields = {f.name: f.default for f in dataclasses.fields(module.Config)}
    argv, wanted = ["--recipe", name, "--epochs", "3", "--seed", "7"], {"epochs": 3, "seed": 7}
    for key, value in recipe.items():
        if isinstance(value, bool) and key not in wanted:
            argv.append(f"--no-{key}" if value else f"--{key}")
            wanted[key] = not value
        elif isinstance(value, tuple) and len(fields[key]) > 1 and key not in wanted:
            other = tuple(v / 2 for v in value)
            argv += [f"--{key}", *map(str, other)]
            wanted[key] = other
    cfg, notes = resolve(script, argv)
    for key, value in wanted.items():
        assert getattr(cfg, key) == value, key
    for key, value in recipe.items():
        if key not in wanted:
            assert getattr(cfg, key) == value, key
    assert len(notes) == 1 and not set(note_values(notes[0], name)) & set(wanted)


def test_without_a_recipe_the_shipped_dataset_still_gets_its_cpu_preset():
    cfg, notes = resolve("train_dino.py", [])
    preset = MODULES["train_dino.py"].PRESETS[hvp_run.DEFAULT_DATASET]
    assert all(getattr(cfg, k) == v for k, v in preset.items())
    assert len(notes) == 1 and notes[0].startswith("preset for the shipped dataset: ")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_the_value_a_run_without_arguments_uses_beside_each_default(script, capsys):
    module = MODULES[script]
    with pytest.raises(SystemExit):
        resolve(script, ["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    defaults = {f.name: f.default for f in dataclasses.fields(module.Config)}
    preset = module.PRESETS[hvp_run.DEFAULT_DATASET]
    assert "a CPU preset replaces some of them" in text
    for key, value in preset.items():
        if value != defaults[key]:
            assert f"(default: {defaults[key]}; {shown(value)} on the shipped dataset)" in text, key
    assert f"(default: {defaults['seed']})" in text, "a flag the preset leaves alone shows its default alone"


def test_an_unknown_recipe_is_a_one_line_error_naming_the_recipes():
    with pytest.raises(hvp_run.HVPError, match=r"unknown --recipe 'dino_vitb8' \(recipes: dino_vitb16_400ep, "):
        resolve("train_dino.py", ["--recipe", "dino_vitb8"])


# ----------------------------------------------------------------------------------- the published runs
# What each source documents (the values, not the code's RECIPES): DINO's args.txt published with each
# checkpoint, the command in iBOT's README, the HVP authors' configs (automl/hvp). A recipe that does
# not set a value listed here, or sets another, fails.

# Precision: DINO's args.txt say "use_fp16": false (fp32: mixed_precision "no"), as does the authors' long
# HVP config (fp16: false); iBOT's README command keeps main_ibot.py's --use_fp16 default, true; the
# authors' default DINO config (automl/hvp, branch dino) says fp16: true.
DINO_B16_400 = dict(arch="vit_base", epochs=400, global_batch=1024, lr=7.5e-4, min_lr=2e-6, teacher_temp=0.07,
                    warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=50, clip_grad=0.3, freeze_last_layer=3,
                    local_crops_number=10, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25), mixed_precision="no")
DINO_S16_800 = dict(arch="vit_small", epochs=800, norm_last_layer=False, clip_grad=0.0, min_lr=1e-5, teacher_temp=0.07,
                    warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30, local_crops_number=10,
                    global_scale=(0.25, 1.0), local_scale=(0.05, 0.25), mixed_precision="no")
IBOT_S16_800 = dict(arch="vit_small", teacher_temp=0.07, warmup_teacher_temp_epochs=30, norm_last_layer=False,
                    epochs=800, global_batch=64 * 16, shared_head=True, out_dim=8192, local_crops_number=10,
                    global_scale=(0.25, 1.0), local_scale=(0.05, 0.25), pred_ratio=(0.0, 0.3), pred_ratio_var=(0.0, 0.2),
                    mixed_precision="fp16")
PLAIN_MULTICROP = dict(global_views=2, local_views=10)   # no selection: 2 globals, every local trained
HVP_DINO = dict(global_views=4, local_views=16)          # the authors: G = 4 candidate globals, 16 candidate locals

PUBLISHED = {
    ("train_dino.py", "dino_vitb16_400ep"): {**DINO_B16_400, **PLAIN_MULTICROP},
    ("train_dino.py", "hvp_dino_vitb16_400ep"): {**DINO_B16_400, **HVP_DINO},
    ("train_dino.py", "dino_vits16_800ep"): {**DINO_S16_800, **PLAIN_MULTICROP},
    ("train_dino.py", "hvp_dino_vits16_800ep"): {**DINO_S16_800, **HVP_DINO},
    ("train_dino.py", "hvp_dino_vits16_100ep"): dict(arch="vit_small", epochs=100, mixed_precision="fp16", **HVP_DINO),
    ("train_ibot.py", "ibot_vits16_800ep"): {**IBOT_S16_800, **PLAIN_MULTICROP},
    ("train_ibot.py", "hvp_ibot_vits16_800ep"): {**IBOT_S16_800, "global_views": 4},
    ("train_simsiam.py", "hvp_simsiam_r50_100ep"): dict(arch="resnet50", epochs=100, global_batch=256, num_views=4,
                                                        mixed_precision="fp16"),
    ("train_simclr.py", "hvp_simclr_r50_100ep"): dict(arch="resnet50", global_batch=4096, lr=0.3, warmup_epochs=10,
                                                      num_views=4, mixed_precision="fp16"),
}


@pytest.mark.parametrize("script,name", sorted(PUBLISHED))
def test_a_published_run_has_the_documented_values(script, name):
    recipe = MODULES[script].RECIPES.get(name)
    assert recipe is not None, f"{script} has no recipe {name}"
    cfg, _ = resolve(script, ["--recipe", name])
    wrong = {key: (getattr(cfg, key), want) for key, want in PUBLISHED[script, name].items()
             if key not in recipe or getattr(cfg, key) != want}
    assert not wrong, f"{name}: (resolved, documented) {wrong}"
    if script == "train_ibot.py":  # a shared head needs one prototype count for [CLS] and patches
        assert cfg.patch_out_dim == cfg.out_dim
    if name.startswith("hvp_ibot"):
        assert cfg.local_views >= cfg.local_crops_number


PINNED_PRECISION_SCRIPTS = SCRIPTS
PRECISION_WORDS = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}  # a --mixed_precision value as a source writes it


@pytest.mark.parametrize("script,name", [(s, n) for s, n in ALL_RECIPES if s in PINNED_PRECISION_SCRIPTS])
def test_a_recipe_pins_a_precision_and_its_source_comment_names_it(script, name):
    precision = MODULES[script].RECIPES[name].get("mixed_precision")
    assert precision in PRECISION_WORDS, f"{name}: no precision pinned (auto or the launcher's would decide)"
    comment = recipes_table.recipe_comments(REPO / script)[name]
    assert PRECISION_WORDS[precision] in comment, f"{name}: the comment does not say it trains in {PRECISION_WORDS[precision]}"


def test_a_precision_on_the_command_line_replaces_the_recipes():
    cfg, notes = resolve("train_dino.py", ["--recipe", "dino_vitb16_400ep", "--mixed_precision", "bf16"])
    assert MODULES["train_dino.py"].RECIPES["dino_vitb16_400ep"]["mixed_precision"] == "no"
    assert cfg.mixed_precision == "bf16" and "mixed_precision" not in note_values(notes[0], "dino_vitb16_400ep")


def test_simclr_and_the_distillation_methods_scale_the_recipe_lr_by_global_batch_over_256():
    # SimCLR's LARS at lr 0.3 x B/256 (4.8 at 4096); DINO/iBOT AdamW at lr x B/256. No flag picks these:
    # the scripts' own code does, so that is what is checked.
    simclr = inspect.getsource(MODULES["train_simclr.py"].main)
    assert "LARS(" in simclr and "cfg.lr * run.global_batch / 256" in simclr
    for script in ("train_dino.py", "train_ibot.py", "train_simsiam.py"):
        assert "cfg.lr * run.global_batch / 256" in inspect.getsource(MODULES[script].main), script


# ----------------------------------------------------------------------------------- a real run prints the recipe

def test_a_dino_run_under_a_recipe_prints_the_values_it_took_from_it(tiny_dataset, tmp_path):
    name = "hvp_dino_vitb16_400ep"
    # the recipe's ViT-B at 224/96 px, 65,536 prototypes and batch 1024 is replaced by a tiny model on the
    # tiny dataset; everything else (schedules, temperatures, scales, G = 4, 16 -> 10 locals, fp32) is the recipe's
    given = {"arch": "vit_tiny", "image_size": 16, "local_size": 8, "out_dim": 64, "global_batch": 0}
    result = run_script(["train_dino.py", "--recipe", name, "--max_steps", 1, "--dataset", tiny_dataset,
                         "--output_dir", tmp_path / "run", "--small_stem", "--batch_size", 2, "--hidden_dim", 64,
                         "--bottleneck_dim", 32, "--num_workers", 0, "--report_to", "none",
                         "--eval_split", "", *[a for k, v in given.items() for a in (f"--{k}", v)]])
    lines = [line for line in result.stdout.splitlines() if line.startswith(f"recipe {name}: ")]
    assert len(lines) == 1, result.stdout
    taken = note_values(lines[0], name)
    recipe = MODULES["train_dino.py"].RECIPES[name]
    assert taken == {k: shown(v) for k, v in recipe.items() if k not in given}
    assert "globals 4 -> 2, locals 16 -> 10" in result.stdout
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    resolved = written["config"]
    assert resolved["recipe"] == name and resolved["lr"] == 7.5e-4 and resolved["local_crops_number"] == 10
    assert resolved["mixed_precision"] == "no" and written["run"]["precision"] == "no"  # DINO's fp32, pinned


def test_a_presets_max_steps_gives_way_to_the_epochs_you_give():
    """The iBOT preset stops at 260 steps (1.67 of its 2 epochs); --epochs N runs N epochs in full,
    --max_steps still sets the length."""
    cfg, notes = resolve("train_ibot.py", [])
    assert (cfg.epochs, cfg.max_steps) == (2, 260) and "max_steps=260" in notes[0]
    cfg, notes = resolve("train_ibot.py", ["--epochs", "3"])
    assert (cfg.epochs, cfg.max_steps) == (3, 0) and "max_steps" not in notes[0]
    cfg, _ = resolve("train_ibot.py", ["--epochs", "3", "--max_steps", "100"])
    assert (cfg.epochs, cfg.max_steps) == (3, 100)
    cfg, _ = resolve("train_ibot.py", ["--max_steps", "100"])
    assert (cfg.epochs, cfg.max_steps) == (2, 100)
