"""Multi-process set-up shared by the entry points (train, evaluate, sample).

Every process runs the same command. `initialize` starts JAX's multi-controller runtime
(`jax.distributed`) from flags, from JAX's own environment variables
(`JAX_COORDINATOR_ADDRESS`, ...) or from the cluster JAX detects (Cloud TPU pod slices,
SLURM, Open MPI, Kubernetes), and does nothing for a single process. After it, `jax.devices()`
lists the devices of all processes; the mesh, the data pipeline (each process reads its own
rows of every global batch), orbax checkpoints and the metric writer (process 0) follow
from `jax.process_index()` / `jax.process_count()`.

A process that dies is noticed by the coordination service: the other processes abort
within about `heartbeat_timeout` seconds (within a second when process 0, the coordinator,
dies), with JAX's message "Terminating process because the JAX distributed service
detected fatal errors ... another task died", instead of waiting in a collective forever.
On CPU, collectives between processes go through gloo.
"""

from __future__ import annotations

import itertools
import os

import jax
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils

# Exit codes of the entry points (documented in the README).
EXIT_OK = 0
# Stopped early by SIGTERM or --time_budget after every process saved the checkpoint
# together: run the same command again to resume (sysexits.h's EX_TEMPFAIL).
EXIT_RESUMABLE = 75

MODES = ("auto", "on", "off")
_BARRIERS = itertools.count()  # barrier ids are used once; every process counts alike


def define_flags() -> None:
    """Defines --distributed, --coordinator_address, --num_processes, --process_id,
    --heartbeat_timeout and --initialization_timeout (call once, at import of an entry point)."""
    flags.DEFINE_enum(
        "distributed", "auto", MODES,
        "Start jax.distributed: 'auto' when --coordinator_address/--num_processes/"
        "--process_id or JAX_COORDINATOR_ADDRESS are given or a multi-process cluster (Cloud "
        "TPU pod slice, SLURM, Open MPI, Kubernetes) is detected; 'on' always; 'off' never.")
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0, the same on every process "
                        "(default: JAX_COORDINATOR_ADDRESS or the cluster's).")
    flags.DEFINE_integer("num_processes", None,
                         "Number of processes (default: the cluster's).")
    flags.DEFINE_integer("process_id", None,
                         "This process's index in [0, num_processes) (default: the cluster's).")
    flags.DEFINE_integer("heartbeat_timeout", 100,
                         "Seconds without a heartbeat after which a process counts as dead "
                         "and the others abort.")
    flags.DEFINE_integer("initialization_timeout", 300,
                         "Seconds to wait for all processes to connect to the coordinator.")


def initialize_from_flags() -> bool:
    """`initialize` with the values of the flags of `define_flags`."""
    values = flags.FLAGS
    return initialize(values.coordinator_address, values.num_processes, values.process_id,
                      mode=values.distributed, heartbeat_timeout=values.heartbeat_timeout,
                      initialization_timeout=values.initialization_timeout)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, mode: str = "auto",
               heartbeat_timeout: int = 100, initialization_timeout: int = 300) -> bool:
    """Starts `jax.distributed` when this is a multi-process run; returns whether it did.

    Must run before any JAX computation. `mode` is 'auto' (start when any of the three
    values, JAX_COORDINATOR_ADDRESS or a multi-process cluster is present), 'on' or 'off'.
    Values left None are filled in by JAX's cluster detection. Raises ValueError naming
    the flag when the values are incomplete or inconsistent.
    """
    if mode not in MODES:
        raise ValueError(f"--distributed must be one of {MODES}, got {mode!r}")
    if jax.distributed.is_initialized():
        return True
    given = {name: value for name, value in (("--coordinator_address", coordinator_address),
                                             ("--num_processes", num_processes),
                                             ("--process_id", process_id))
             if value is not None}
    if os.environ.get("JAX_COORDINATOR_ADDRESS") and coordinator_address is None:
        given["JAX_COORDINATOR_ADDRESS"] = os.environ["JAX_COORDINATOR_ADDRESS"]
    if mode == "off":
        if given:
            raise ValueError(f"--distributed=off contradicts {', '.join(given)}")
        return False
    cluster = detected_cluster()
    if mode == "auto" and not given and cluster is None:
        return False
    if cluster is None:
        missing = [name for name, value in (("--coordinator_address", coordinator_address
                                             or os.environ.get("JAX_COORDINATOR_ADDRESS")),
                                            ("--num_processes", num_processes),
                                            ("--process_id", process_id)) if value is None]
        if missing:
            raise ValueError(
                f"a multi-process run needs {', '.join(missing)} (no cluster environment "
                "such as SLURM or a Cloud TPU pod slice was detected to supply them); "
                "pass --distributed=off for a single process")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num_processes must be at least 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} must lie in [0, --num_processes="
                         f"{num_processes})")
    # dlm handles SIGTERM itself (dlm.training.preemption), also for one process and for
    # time budgets; JAX's preemption notifier would swallow the signal.
    jax.config.update("jax_enable_preemption_service", False)
    if not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address, num_processes, process_id,
        heartbeat_timeout_seconds=heartbeat_timeout,
        initialization_timeout=initialization_timeout)
    if jax.process_index() != 0:
        # Logs are written once: the other processes report warnings and errors only.
        logging.set_verbosity(logging.WARNING)
    logging.info("jax.distributed: %d processes%s, %d devices (%d on this process)",
                 jax.process_count(), f" ({cluster})" if cluster else "",
                 jax.device_count(), jax.local_device_count())
    return True


def detected_cluster() -> str | None:
    """The name of the multi-process cluster JAX's auto-detection finds (a Cloud TPU pod
    slice, SLURM with several tasks, ...), or None (also for a single-process allocation)."""
    try:  # JAX's cluster registry is internal: treat any change in it as "none detected"
        from jax._src import clusters

        for env in clusters.ClusterEnv._cluster_types:
            if env.opt_in_only_method or not env.is_env_present():
                continue
            if (env.get_process_count() or 1) > 1:
                return env.__name__
    except Exception as error:  # noqa: BLE001 - detection must never break a local run
        logging.warning("cluster detection failed (%s); assuming a single process", error)
    return None


def is_main_process() -> bool:
    """Whether this process writes files and prints results (process 0)."""
    return jax.process_index() == 0


def fetch(tree):
    """Host (numpy) copies of the arrays in `tree`, gathered from all processes when an
    array is split over several (a collective: every process must call it)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def barrier(name: str, timeout_seconds: int = 7200) -> None:
    """Waits until every process reaches `barrier(name)` (no-op for one process)."""
    if jax.process_count() == 1:
        return
    name = f"{name}-{next(_BARRIERS)}"
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:  # multi-process without jax.distributed (e.g. TPU runtime only)
        multihost_utils.sync_global_devices(name)
    else:
        client.wait_at_barrier(name, timeout_in_ms=timeout_seconds * 1000)


def main_process_first(fn, name: str):
    """`fn()` on process 0, then, once it returned, on every other process: for work that
    writes shared files the others then read (preparing a dataset). Returns fn's result."""
    if jax.process_index() == 0:
        result = fn()
    barrier(name)
    return result if jax.process_index() == 0 else fn()
