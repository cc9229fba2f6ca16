"""``jaxquant quantize --recipe <adatsq>`` on a DiT pipeline: Fisher weights, the option models, the
policy search with its progress bar; the result (options, policy.json, Pareto plot) is saved, and
``jaxquant sample`` applies the policy. Bad AdaTSQ recipes, a wrong step count and a missing
option's weights are refused by name."""

import json
import shutil

import numpy as np
import pytest
import yaml

from jaxquant.cli.main import main
from jaxquant.diffusion.adatsq import load_adatsq, load_adatsq_recipe
from jaxquant.recipes import RecipeError
from tests.diffusion.test_cli_sample import _pipeline

RECIPE = {"name": "adatsq_tiny", "kind": "adatsq", "budget": 5.0,
          "options": [{"name": "w8a8", "recipe": "dit_gptq_w8a8", "cost": 8},
                      {"name": "w3a3", "recipe": "dit_gptq_w3a3", "cost": 3}],
          "search": {"beam_width": 3, "rollout": "fp", "n_per_class": 1, "seed": 7},
          "fisher": {"temperature": 1.0, "n_per_step": 2},
          "sampler": {"steps": 4, "guidance": 1.5},
          "calibration": {"n_per_class": 3, "seed": 1}}


def test_quantize_saves_a_policy_and_sample_applies_it(tmp_path, capsys):
    import matplotlib.image as mpimg

    d = _pipeline(tmp_path / "pipe")
    rpath = tmp_path / "adatsq_tiny.yaml"
    rpath.write_text(yaml.safe_dump(RECIPE))
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(d / "transformer"), "--recipe", str(rpath),
                 "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(res["policy"]) == 4 and res["avg_bits"] <= 5.0 + 1e-9
    assert set(res["policy"]) <= {"w8a8", "w3a3"}
    assert (out / "pareto.png").is_file() and (out / "options" / "w3a3").is_dir()
    _, options, policy, meta = load_adatsq(out)
    assert [meta["options"][k] for k in policy] == res["policy"] and len(options) == 2
    grid = tmp_path / "g.png"
    assert main(["sample", "--model", str(out), "--steps", "4", "--classes", "0,1",
                 "--per-class", "1", "--out", str(grid)]) == 0
    assert mpimg.imread(grid).std() > 0
    capsys.readouterr()
    assert main(["sample", "--model", str(out), "--steps", "5", "--out", str(grid)]) == 2
    assert "the policy has 4 steps; sample with --steps 4" in capsys.readouterr().err
    # a rerun: refused without --resume; with it, the saved options are reused (same policy)
    assert main(["quantize", "--model", str(d / "transformer"), "--recipe", str(rpath),
                 "--out", str(out)]) == 2
    assert "pass resume=True (--resume)" in capsys.readouterr().err
    stamp = (out / "options" / "w8a8" / "jaxquant.json").stat().st_mtime_ns
    assert main(["quantize", "--model", str(d / "transformer"), "--recipe", str(rpath),
                 "--out", str(out), "--resume"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["policy"] == res["policy"]  # the reloaded options give the same search
    assert (out / "options" / "w8a8" / "jaxquant.json").stat().st_mtime_ns == stamp
    shutil.rmtree(out / "options" / "w3a3")
    with pytest.raises(FileNotFoundError, match=r"option 'w3a3', but options/w3a3/"):
        load_adatsq(out)


def test_bad_adatsq_recipes():
    with pytest.raises(RecipeError, match=r"budget must be an average bit-width in \[3, 8\]"):
        load_adatsq_recipe({**RECIPE, "budget": 2.0})
    with pytest.raises(RecipeError, match=r"options\[1\]\.recipe 'dit_gptq_w1a1'"):
        load_adatsq_recipe({**RECIPE, "options": [RECIPE["options"][0],
                                                  {"name": "x", "recipe": "dit_gptq_w1a1",
                                                   "cost": 1}]})
    with pytest.raises(RecipeError, match=r"search\.rollout must be 'budget', 'fp' or an opt"):
        load_adatsq_recipe({**RECIPE, "search": {"rollout": "w2"}})
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['beam'\]"):
        load_adatsq_recipe({**RECIPE, "beam": 4})
    rec = load_adatsq_recipe({**RECIPE, "fisher": False})
    assert rec.fisher is None and rec.costs == [8.0, 3.0]
    np.testing.assert_equal(rec.names, ["w8a8", "w3a3"])
