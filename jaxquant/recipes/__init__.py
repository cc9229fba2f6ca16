"""Recipes: ordered regex rules on parameter paths -> algorithm + spec + options (data)."""

from jaxquant.recipes.recipe import Recipe, RecipeError, Rule, load_recipe

__all__ = ["Recipe", "RecipeError", "Rule", "load_recipe"]
