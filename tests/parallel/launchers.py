"""Start a worker script on N local CPU processes under each supported launcher."""
import os
import shutil
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHERS = ("horovodrun", "mpirun", "torchrun")


def _mpirun_flags(np):
    flags = ["-np", str(np), "--oversubscribe", "--bind-to", "none",
             "--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", "lo", "--mca", "oob_tcp_if_include", "lo"]
    if os.geteuid() == 0:
        flags.insert(0, "--allow-run-as-root")
    return flags


def command(launcher, np, script, args):
    py = [sys.executable, script, *args]
    if launcher == "horovodrun":
        return ["horovodrun", "-np", str(np), "-H", f"localhost:{np}", "--gloo", "--network-interface", "lo", *py]
    if launcher == "mpirun":
        return ["mpirun", *_mpirun_flags(np), *py]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={np}", *py[1:]]
    raise ValueError(launcher)


def missing(launcher):
    """Why a launcher cannot run here, or None."""
    if launcher == "horovodrun":
        try:
            import horovod.torch  # noqa: F401
        except ImportError as exc:
            return f"horovod.torch is not importable ({exc}); run setup-utils/install.sh"
        if shutil.which("horovodrun") is None:
            return "horovodrun is not on PATH; run setup-utils/install.sh"
    if launcher == "mpirun" and shutil.which("mpirun") is None:
        return "mpirun is not on PATH; run setup-utils/install-mpi.sh"
    return None


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def require(*launchers):
    """Skip the test when a launcher cannot run here; under CI=true that is a failure, not a skip."""
    import pytest

    reason = next(filter(None, (missing(launcher) for launcher in launchers)), None)
    if reason:
        pytest.fail(reason) if os.environ.get("CI") else pytest.skip(reason)


def launch(launcher, np, script, *args, timeout=300):
    """Like ``run``, whatever the exit status; on ``timeout`` the launcher's whole process group is killed
    (ranks included) and ``subprocess.TimeoutExpired`` raised."""
    proc = subprocess.Popen(command(launcher, np, script, args), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run(launcher, np, script, *args, timeout=300):
    """``script`` is a file, or ``-m`` followed by a module name in ``args``."""
    proc = subprocess.run(command(launcher, np, script, args), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{launcher} -np {np} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def run_worker_world(launcher, np, worker, out_dir):
    """Run a results-writing worker on one world and return its ``rank<r>.json`` results in rank order.

    ``launcher`` "single" runs one process without a launcher (the single-process communicator, as a
    one-device run uses it); otherwise the worker runs under ``launcher`` with its backend argument ("torch"
    under torchrun, "horovod" under horovodrun). The worker's arguments are that mode and ``out_dir``."""
    import json

    if launcher == "single":
        proc = subprocess.run([sys.executable, worker, "single", out_dir], cwd=ROOT, env=_env(), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    else:
        require(launcher)
        run(launcher, np, worker, "torch" if launcher == "torchrun" else "horovod", out_dir)
    return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(np)]
