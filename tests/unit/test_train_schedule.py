"""The translation recipe's schedule and weighting: warm-up-stable-decay learning rates, --repeat groups, and which
fields a resumed run may change."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from training.data.corpus import Pair
from training.loop import resumed_config
from training.train import TrainConfig, TranslationRecipe, repeats, times_repeated


def rates(cfg: TrainConfig, steps: list[int]) -> list[float]:
    recipe = TranslationRecipe(cfg)
    return [round(recipe.learning_rate(s), 6) for s in steps]


def test_the_learning_rate_warms_up_stays_and_decays_to_zero_at_max_steps() -> None:
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=100, cooldown_steps=20)
    assert rates(cfg, [0, 9, 10, 79, 80, 90, 99]) == [1e-4, 1e-3, 1e-3, 1e-3, 1e-3, 5e-4, 5e-5]
    assert rates(TrainConfig(lr=1e-3), [0, 5000]) == [1e-3, 1e-3]  # constant without either


def test_cooldown_needs_a_step_budget_and_repeat_a_known_group() -> None:
    with pytest.raises(ValueError, match="--max-steps"):
        TrainConfig(cooldown_steps=100)
    for bad in ("ding=2", "placeholders", "gettext=0", "ddtp=x"):
        with pytest.raises(ValueError, match="--repeat"):
            TrainConfig(repeat=bad)
    assert repeats(" ding-phrases=2, placeholders=3 ") == {"ding-phrases": 2, "placeholders": 3}
    assert repeats("") == {}


def test_a_pair_is_repeated_as_often_as_its_heaviest_group() -> None:
    weights = repeats("ding-phrases=2,gettext=2,placeholders=3")
    assert times_repeated(Pair("Hund", "dog", False, "ding"), weights) == 2
    assert times_repeated(Pair("Er schläft.", "He sleeps.", True, "ding"), weights) == 1
    assert times_repeated(Pair("Datei %s fehlt", "File %s missing", False, "gettext", "pkg"), weights) == 3
    assert times_repeated(Pair("Datei fehlt", "File missing", False, "gettext", "pkg"), weights) == 2
    # A placeholder-like token the translation does not keep is translated text, not a placeholder.
    assert times_repeated(Pair("<Datei> öffnen", "open <file>", False, "gettext", "pkg"), weights) == 2
    assert times_repeated(Pair("Ein Paket.", "A package.", True, "ddtp", "pkg"), weights) == 1


def test_a_resumed_run_keeps_its_model_and_takes_the_new_schedule_folder_and_budget() -> None:
    saved = asdict(TrainConfig(out="runs/a", hidden_dim=64, lr=1e-3, max_steps=1000, threads=1))
    given = TrainConfig(out="runs/b", hidden_dim=32, lr=5e-4, max_steps=1500, cooldown_steps=500,
                        repeat="placeholders=2")
    cfg = resumed_config(TrainConfig, given, saved)
    assert (cfg.out, cfg.lr, cfg.max_steps, cfg.cooldown_steps, cfg.repeat) == (
        "runs/b", 5e-4, 1500, 500, "placeholders=2")
    assert cfg.hidden_dim == 64  # the weights were trained for the saved shape
    assert cfg.threads == 1  # not given anew (the default): the saved value stays
    # A checkpoint written before a field existed resumes with the field's default.
    old = {k: v for k, v in saved.items() if k not in ("cooldown_steps", "repeat")}
    assert resumed_config(TrainConfig, TrainConfig(max_steps=1200), old).repeat == ""
