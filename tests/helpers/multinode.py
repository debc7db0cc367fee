"""Two "nodes" on this machine: two torchrun launches of one process each (gloo) that meet at a rendezvous on the
loopback interface, as `torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:PORT` does on two machines; and
stand-ins for Slurm's `srun` and `scontrol`, to run the Slurm example (examples/slurm/captune.sbatch) the same way.

With one process per node every process has LOCAL_RANK 0, so a write or a print meant for global rank 0 that is
made by each node's local rank 0 happens twice, and shows."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SLURM_EXAMPLE = ROOT / "examples" / "slurm" / "captune.sbatch"
TIMEOUT_S = 180  # a hang (processes waiting for each other in a collective) fails the test instead of CI's timeout
NODE_ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TORCH_SHOW_CPP_STACKTRACES": "1",
            "PYTHONFAULTHANDLER": "1"}
# what a rendezvous that cannot listen on its port says (another program took the free port first, or no loopback)
BIND_ERRORS = ("address already in use", "eaddrinuse", "errno: 98", "cannot assign requested address",
               "failed to listen", "failed to bind")

# srun's stand-in: the command once per node of the job, all at once, each node's output in nodeN.out / nodeN.err
FAKE_SRUN = """#!/bin/bash
while [[ $1 == -* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_STEP_NUM_TASKS=$SLURM_JOB_NUM_NODES "$@" >node$node.out 2>node$node.err &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
exit $rc
"""
FAKE_SCONTROL = """#!/bin/bash
echo 127.0.0.1
"""


def free_port() -> int:
    """A port on 127.0.0.1 that is free now; the test is skipped when nothing can listen on the loopback."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    except OSError as e:
        pytest.skip(f"cannot listen on 127.0.0.1 for torchrun's rendezvous: {e}")


def node_command(node_rank: int, port: int, args: list[str], rendezvous: str = "static") -> list[str]:
    """torchrun for one of two nodes, one process: `static` names the node's rank (global ranks follow it), `c10d`
    lets the rendezvous assign them, as the Slurm example does."""
    how = (["--node-rank", str(node_rank)] if rendezvous == "static"
           else ["--rdzv-backend", "c10d", "--rdzv-id", f"test-{port}"])
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", *how,
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", "0", "-m", "captune", *args]


def two_nodes(args: list[str], cwds: tuple[Path, Path], rendezvous: str = "static"
              ) -> list[subprocess.CompletedProcess]:
    """`captune ARGS` on two nodes (node 0 runs in cwds[0], node 1 in cwds[1]), at the same time."""
    port = free_port()
    return run_all([(node_command(r, port, args, rendezvous), cwd) for r, cwd in enumerate(cwds)])


def slurm_job(args: list[str], cwd: Path, nodes: int = 2) -> list[subprocess.CompletedProcess]:
    """The Slurm example run as `sbatch --nodes N examples/slurm/captune.sbatch ARGS` would run it, on this machine
    with one process per node; returns each node's output (from the srun stand-in's nodeN.out / nodeN.err)."""
    bin_dir = cwd / "fake-slurm-bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_JOB_ID": "4242",
           "GPUS_PER_NODE": "1", "MASTER_PORT": str(free_port())}
    [job] = run_all([(["bash", str(SLURM_EXAMPLE), *args], cwd)], env)
    nodes_out = [subprocess.CompletedProcess(job.args, job.returncode, (cwd / f"node{n}.out").read_text(),
                                             (cwd / f"node{n}.err").read_text()) for n in range(nodes)]
    _skip_if_unbound(nodes_out)
    return nodes_out


def run_all(commands: list[tuple[list[str], Path]], env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Start every command at once (each in its own session: stopped whole on a timeout), wait for all; outputs go
    to files, so that no process blocks on a full pipe while the others wait for it."""
    env = {**os.environ, **NODE_ENV, **(env or {})}
    with contextlib.ExitStack() as files:
        outputs = [tuple(files.enter_context(tempfile.TemporaryFile("w+")) for _ in "oe") for _ in commands]
        procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True)
                 for (cmd, cwd), (out, err) in zip(commands, outputs)]
        deadline = time.monotonic() + TIMEOUT_S
        try:
            for proc in procs:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _stop(procs)
            pytest.fail(f"still running after {TIMEOUT_S} s (processes waiting for each other?):\n"
                        + "\n".join(_read(err)[-3000:] for _, err in outputs))
        runs = [subprocess.CompletedProcess(cmd, proc.returncode, _read(out), _read(err))
                for (cmd, _), proc, (out, err) in zip(commands, procs, outputs)]
    _skip_if_unbound(runs)
    return runs


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to each launch's process group (torchrun passes it on to its workers, which run in sessions of their
    own, and stops them), SIGKILL to what is left after a grace period."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _read(f) -> str:
    f.seek(0)
    return f.read()


def _skip_if_unbound(runs: list[subprocess.CompletedProcess]) -> None:
    for run in runs:
        if run.returncode and any(e in run.stderr.lower() for e in BIND_ERRORS):
            pytest.skip("torchrun's rendezvous could not listen on 127.0.0.1: "
                        + next(line for line in run.stderr.splitlines() if any(e in line.lower() for e in BIND_ERRORS)))


def succeeded(runs: list[subprocess.CompletedProcess]) -> list[subprocess.CompletedProcess]:
    """`runs`, after failing the test unless every node exited with 0 (its error lines and the tail of stderr)."""
    for node, run in enumerate(runs):
        if run.returncode:
            keys = ("error", "terminate", "what()", "signal", "exception", "abort")
            picked = [line for line in run.stderr.splitlines() if any(k in line.lower() for k in keys)][:30]
            pytest.fail(f"node {node} exited with {run.returncode}:\n" + "\n".join(picked) + "\n...\n"
                        + run.stderr[-3000:])
    return runs
