"""One process of a multi-process calibration job (tests/calibration/test_multihost.py).

``python multihost_worker.py PORT NPROC PID OUT RECIPE CALIB [--stop-after B] [--resume]``:
joins a ``jax.distributed`` job on localhost with 4 CPU devices and the gloo collectives,
quantizes the model in ``$JQ_MODEL`` with the engine over a ``("data", "model")`` mesh of every
process's devices, and, with ``--stop-after B``, dies (exit 17) right after block ``B``'s
checkpoint, as a preempted host would. ``RECIPE`` and ``CALIB`` may hold ``{pid}``:
per-process inputs.
"""

import argparse
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main() -> int:
    p = argparse.ArgumentParser()
    for a in ("port", "nproc", "pid", "out", "recipe", "calib"):
        p.add_argument(a)
    p.add_argument("--stop-after", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    jax.distributed.initialize(f"localhost:{a.port}", num_processes=int(a.nproc),
                               process_id=int(a.pid))
    import numpy as np
    from jax.sharding import Mesh

    from jaxquant.calibration import distributed as D
    from jaxquant.calibration.engine import ResumeMismatchError, calibrate
    from jaxquant.models.loading import adapter_for
    from jaxquant.models.quantized import save_tree
    from jaxquant.recipes import load_recipe

    devs = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = Mesh(np.array(devs).reshape(-1, 2), ("data", "model"))
    tokens = np.load(a.calib.format(pid=a.pid), allow_pickle=False)

    def stop(b, info):
        if a.stop_after is not None and b == a.stop_after:
            os._exit(17)

    try:
        recipe = load_recipe(a.recipe.format(pid=a.pid))
        res = calibrate(adapter_for(os.environ["JQ_MODEL"]), recipe, tokens,
                        out_dir=a.out, resume=a.resume, mesh=mesh, model_axis="model",
                        progress=False, on_block_end=stop)
    except D.DistributedMismatchError as e:
        print(f"MISMATCH: {e}", file=sys.stderr)
        return 3
    except ResumeMismatchError as e:
        print(f"RESUME-MISMATCH: {e}", file=sys.stderr)
        return 4
    save_tree(os.path.join(a.out, "final"), res.params)
    print(f"DONE resumed_from={res.resumed_from}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
