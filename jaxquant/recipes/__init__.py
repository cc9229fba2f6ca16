"""Recipes: ordered regex rules on parameter paths -> algorithm + QuantSpec (data, not code)."""

from jaxquant.recipes.recipe import ALGORITHMS, Recipe, Rule, load_recipe

__all__ = ["ALGORITHMS", "Recipe", "Rule", "load_recipe"]
