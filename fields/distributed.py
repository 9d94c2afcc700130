"""Multi-process (multi-host) runs through JAX's own runtime, ``jax.distributed``.

Every program that can run on several hosts takes the same three options (``add_distributed_arguments``)
and calls ``initialize_distributed_from_args`` before its first JAX computation:

    # host 0 (also the coordinator)                 # host 1
    python -m PROGRAM ... --coordinator host0:1234   python -m PROGRAM ... --coordinator host0:1234 \\
        --num-processes 2 --process-id 0                 --num-processes 2 --process-id 1

On managed clusters (SLURM, Cloud TPU, Open MPI) ``jax.distributed.initialize`` infers the process count
and id, so ``--coordinator`` alone is enough. Without ``--coordinator`` nothing happens: one process.
On CPU the processes' collectives run over gloo (JAX's default CPU collectives implementation).
"""

from __future__ import annotations

import jax

from fields.cli import UserError

_initialized = False


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Joins a multi-process run; call it in every process before any other JAX computation.

    Each process passes the same ``coordinator`` (``host:port`` of process 0) and ``num_processes``
    and its own ``process_id`` in ``[0, num_processes)``. Calling it again (e.g. from a library
    function after the CLI did) does nothing. Without a coordinator this does nothing (one process).

    Raises:
        UserError: a process count or id without a coordinator, or an id outside ``[0, num_processes)``.
    """
    global _initialized
    if coordinator is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise UserError("--num-processes/--process-id need --coordinator HOST:PORT")
        return
    if num_processes is not None and num_processes < 1:
        raise UserError(f"--num-processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise UserError(f"--process-id must lie in [0, {num_processes}), got {process_id}")
    if _initialized:
        return
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    _initialized = True


def add_distributed_arguments(parser) -> None:
    """Adds ``--coordinator --num-processes --process-id`` (see ``initialize_distributed``); adding them
    twice to one parser is a no-op."""
    if "--coordinator" in getattr(parser, "_option_string_actions", {}):
        return
    group = parser.add_argument_group("multi-host (one process per host, through jax.distributed)")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0 (enables the multi-process run)")
    group.add_argument("--num-processes", type=int, help="number of processes (inferred on managed clusters)")
    group.add_argument("--process-id", type=int, help="this process's id in [0, num-processes)")


def initialize_distributed_from_args(args) -> None:
    """``initialize_distributed`` with the arguments of ``add_distributed_arguments`` (missing ones: None)."""
    initialize_distributed(
        getattr(args, "coordinator", None), getattr(args, "num_processes", None), getattr(args, "process_id", None)
    )


def process_shard() -> tuple[int, int]:
    """``(process index, process count)``: the share of a job this process takes (``(0, 1)`` alone)."""
    return jax.process_index(), jax.process_count()
