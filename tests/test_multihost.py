"""Several processes on one machine: jax.distributed over localhost, gloo CPU collectives.

Each run is `experiments.train` as a user launches it, one subprocess per process with its
own fake CPU devices (JAX_NUM_CPU_DEVICES). Every subprocess has a deadline, so a hang
fails the test instead of blocking it.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import small_config, train_losses

from dlm import runs
from dlm.parallel import distributed
from dlm.runs import checkpoint as checkpoint_lib
from dlm.training import experiment, preemption, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 24  # long enough for a signal to land mid-run
DEADLINE = 420  # seconds for any one launch (start-up, compile, steps, save, exit)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train_command(workdir, data_dir, *flags):
    overrides = {
        "total_steps": TOTAL_STEPS, "log_every": 1, "checkpoint_every": 8, "eval_every": 1000,
        "eval.num_batches": 1, "data.data_dir": data_dir, "data.seq_len": 32,
        "data.batch_size": 8, "model.hidden": 32, "model.layers": 2, "model.heads": 2,
        "model.kv_heads": 2, "model.cond_dim": 32, "optimizer.warmup_steps": 2,
    }
    return ([sys.executable, "-m", "experiments.train", "--config=configs/mdlm.py:micro",
             f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
            + list(flags))


class Launch:
    """`num_processes` processes of one command, each with `devices` fake CPU devices."""

    def __init__(self, command, log_dir, num_processes: int, devices: int):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)}
        env.pop("XLA_FLAGS", None)
        port = _free_port()
        self.logs = [log_dir / f"process{i}.log" for i in range(num_processes)]
        log_dir.mkdir(parents=True, exist_ok=True)
        self.processes = []
        for i, log in enumerate(self.logs):
            flags = ([f"--coordinator_address=localhost:{port}",
                      f"--num_processes={num_processes}", f"--process_id={i}",
                      "--heartbeat_timeout=5", "--initialization_timeout=120"]
                     if num_processes > 1 else [])
            with open(log, "w") as out:
                self.processes.append(subprocess.Popen(
                    command + flags, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
        self.started = time.monotonic()

    def wait(self, timeout: float = DEADLINE) -> list[int]:
        """Exit codes; kills everything and fails the test after `timeout` seconds."""
        codes = []
        for process in self.processes:
            left = max(self.started + timeout - time.monotonic(), 1)
            try:
                codes.append(process.wait(timeout=left))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"processes still running after {timeout}s:\n{self.tails()}")
        return codes

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    def tails(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-chars:]}" for log in self.logs)


def _run(command, log_dir, num_processes, devices, expect=0):
    launch = Launch(command, log_dir, num_processes, devices)
    codes = launch.wait()
    assert codes == [expect] * num_processes, launch.tails()
    return launch


def _wait_for_step(workdir, step: int, launch: Launch) -> None:
    deadline = time.monotonic() + DEADLINE
    path = workdir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and max(train_losses(workdir), default=0) >= step:
            return
        if any(p.poll() is not None for p in launch.processes):
            launch.kill()
            pytest.fail(f"a process exited before step {step}:\n{launch.tails()}")
        time.sleep(0.05)
    launch.kill()
    pytest.fail(f"step {step} not reached in {DEADLINE}s:\n{launch.tails()}")


def _json_lines(log) -> list[dict]:
    """The JSON objects a process printed (its log also holds gloo's and absl's lines)."""
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def _checkpoint_steps(workdir) -> list[int]:
    """The complete checkpoints (orbax renames a checkpoint's folder to its step when done)."""
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _checkpoint(workdir, step: int):
    """(train state as numpy, {data iterator file: content}) of checkpoint `step`."""
    exp = experiment.build(runs.load_config(workdir))
    state, _ = checkpoint_lib.restore_from_workdir(
        workdir, checkpoint_lib.abstract_like(exp.init_state()), step=step)
    data = workdir / "checkpoints" / str(step) / "data"
    return jax.device_get(state), {p.name: json.loads(p.read_text())
                                   for p in sorted(data.glob("process_*.json"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted one-process run with 4 devices (it also prepares the dataset)."""
    root = tmp_path_factory.mktemp("multihost")
    data_dir = str(root / "tfds")
    workdir = root / "one_process"
    _run(_train_command(workdir, data_dir), root / "logs_one", 1, 4)
    return root, data_dir, workdir


@pytest.mark.slow  # run by .ci/run after `make test` (make test-slow)
def test_two_processes_equal_one_process(reference):
    root, data_dir, one = reference
    two = root / "two_processes"
    _run(_train_command(two, data_dir), root / "logs_two", 2, 2)
    losses_one, losses_two = train_losses(one), train_losses(two)
    assert sorted(losses_two) == list(range(1, TOTAL_STEPS + 1))
    np.testing.assert_allclose([losses_two[s] for s in sorted(losses_two)],
                               [losses_one[s] for s in sorted(losses_two)], rtol=1e-5)
    # Process 0 alone writes the metrics: one row per step.
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "train/loss" in r]) == TOTAL_STEPS
    state_one, data_one = _checkpoint(one, TOTAL_STEPS)
    state_two, data_two = _checkpoint(two, TOTAL_STEPS)
    assert int(state_two.step) == TOTAL_STEPS
    np.testing.assert_array_equal(state_two.rng, state_one.rng)
    # Gloo sums across processes in another order than one process does across its
    # devices: 24 steps of Adam leave float32 rounding differences (|diff| < 1e-6).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
                 state_two, state_one)
    # Every process saved its own data iterator, at the same position as the single one.
    assert sorted(data_two) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert list(data_two.values()) == [data_one["process_0-of-1.json"]] * 2


@pytest.mark.slow  # run by .ci/run after `make test` (make test-slow)
def test_sigterm_to_one_process_saves_together_and_resumes_the_same_curve(reference):
    root, data_dir, one = reference
    workdir = root / "sigterm_one"
    launch = Launch(_train_command(workdir, data_dir), root / "logs_sigterm", 2, 2)
    _wait_for_step(workdir, 3, launch)
    launch.processes[1].send_signal(signal.SIGTERM)  # only the second process is told
    codes = launch.wait()
    assert codes == [distributed.EXIT_RESUMABLE] * 2, launch.tails()
    stopped = max(train_losses(workdir))
    assert 3 <= stopped < TOTAL_STEPS
    assert _checkpoint_steps(workdir)[-1] == stopped
    assert "SIGTERM" in launch.logs[0].read_text()  # process 0 stopped for process 1's signal
    _run(_train_command(workdir, data_dir), root / "logs_resume", 2, 2)
    losses, straight = train_losses(workdir), train_losses(one)
    assert sorted(losses) == list(range(1, TOTAL_STEPS + 1))
    np.testing.assert_allclose([losses[s] for s in range(1, TOTAL_STEPS + 1)],
                               [straight[s] for s in range(1, TOTAL_STEPS + 1)], rtol=1e-5)


@pytest.mark.slow
def test_sigterm_to_all_and_a_time_budget_resume_the_same_curve(reference):
    root, data_dir, one = reference
    workdir = root / "sigterm_all"
    launch = Launch(_train_command(workdir, data_dir), root / "logs_all", 2, 2)
    _wait_for_step(workdir, 3, launch)
    for process in launch.processes:
        process.send_signal(signal.SIGTERM)
    assert launch.wait() == [distributed.EXIT_RESUMABLE] * 2, launch.tails()
    first_stop = max(train_losses(workdir))
    # A budget shorter than start-up stops the resumed run after its first agreed poll.
    _run(_train_command(workdir, data_dir, "--time_budget=1s"), root / "logs_budget", 2, 2,
         expect=distributed.EXIT_RESUMABLE)
    second_stop = max(train_losses(workdir))
    assert first_stop < second_stop < TOTAL_STEPS
    _run(_train_command(workdir, data_dir), root / "logs_finish", 2, 2)
    losses, straight = train_losses(workdir), train_losses(one)
    np.testing.assert_allclose([losses[s] for s in range(1, TOTAL_STEPS + 1)],
                               [straight[s] for s in range(1, TOTAL_STEPS + 1)], rtol=1e-5)


@pytest.mark.slow
def test_evaluate_and_sample_on_two_processes_print_what_one_process_prints(reference):
    root, _, workdir = reference
    commands = {
        "evaluate": [sys.executable, "-m", "experiments.evaluate", f"--workdir={workdir}"],
        "sample": [sys.executable, "-m", "experiments.sample", f"--workdir={workdir}",
                   "--num_samples=4", "--batch_size=4", "--steps=8"],
    }
    for name, command in commands.items():
        outputs = {}
        for processes, devices in ((1, 4), (2, 2)):
            out = root / f"{name}{processes}.jsonl"
            launch = _run(command + [f"--out={out}"] if name == "sample" else command,
                          root / f"logs_{name}{processes}", processes, devices)
            printed = [_json_lines(log) for log in launch.logs]
            assert len(printed[0]) == 1 and all(not p for p in printed[1:])  # process 0 only
            outputs[processes] = (printed[0][0] if name == "evaluate" else
                                  [json.loads(line)["tokens"]
                                   for line in out.read_text().splitlines()])
        if name == "evaluate":
            assert outputs[2].pop("split") == outputs[1].pop("split") == "validation"
            assert outputs[2] == pytest.approx(outputs[1], rel=1e-6)
        else:
            assert outputs[2] == outputs[1]


@pytest.mark.slow  # run by .ci/run after `make test` (make test-slow)
def test_a_killed_process_makes_the_other_fail_quickly(reference):
    root, data_dir, _ = reference
    workdir = root / "sigkill"
    launch = Launch(_train_command(workdir, data_dir), root / "logs_kill", 2, 2)
    _wait_for_step(workdir, 2, launch)
    launch.processes[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    try:
        code = launch.processes[0].wait(timeout=60)
    except subprocess.TimeoutExpired:
        launch.kill()
        pytest.fail(f"process 0 still running 60 s after process 1 died:\n{launch.tails()}")
    seconds = time.monotonic() - killed
    launch.kill()
    assert code != 0 and code != distributed.EXIT_RESUMABLE
    log = launch.logs[0].read_text()
    assert "another task died" in log, log[-3000:]
    assert seconds < 30, seconds  # heartbeat timeout 5 s, plus detection and abort


@pytest.mark.slow
def test_time_budget_in_process_saves_and_resumes(tmp_path):
    config = small_config(tmp_path / "tfds")
    straight = trainer.train(config, tmp_path / "straight")
    with pytest.raises(trainer.Preempted) as stopped:
        trainer.train(config, tmp_path / "budget", time_budget=1e-6)
    assert stopped.value.step == 1 and stopped.value.reason == preemption.TIME_BUDGET
    assert _checkpoint_steps(tmp_path / "budget") == [1]
    resumed = trainer.train(config, tmp_path / "budget")
    assert resumed["train/loss"] == pytest.approx(straight["train/loss"], rel=1e-6)
    assert train_losses(tmp_path / "budget") == pytest.approx(train_losses(tmp_path / "straight"),
                                                         rel=1e-6)


def test_sigterm_sets_the_stop_request_of_one_process():
    stop = preemption.StopRequest()
    before = signal.getsignal(signal.SIGTERM)
    stop.install(mesh=None)
    try:
        assert stop.poll() is None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs between bytecodes
        assert stop.poll() == preemption.SIGTERM
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) == before


def test_time_budget_stops_when_the_clock_passes_it():
    now = [100.0]
    stop = preemption.StopRequest(time_budget=30, clock=lambda: now[0])
    stop.install(mesh=None)
    try:
        now[0] = 129.9
        assert stop.poll() is None
        now[0] = 130.0
        assert stop.poll() == preemption.TIME_BUDGET
    finally:
        stop.uninstall()


@pytest.mark.parametrize("text, seconds", [("90", 90), ("2.5", 2.5), ("45s", 45), ("30m", 1800),
                                           ("4h", 14400), ("1h30m", 5400), ("1d", 86400),
                                           (None, None), ("", None)])
def test_parse_duration(text, seconds):
    assert preemption.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["4 hours", "h", "-5", "0", "1x"])
def test_parse_duration_refuses_bad_values(text):
    with pytest.raises(ValueError, match="--time_budget"):
        preemption.parse_duration(text)


def test_initialize_refuses_incomplete_or_contradictory_flags(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.setattr(distributed, "detected_cluster", lambda: None)
    with pytest.raises(ValueError, match="--coordinator_address, --process_id"):
        distributed.initialize(num_processes=2)
    with pytest.raises(ValueError, match="--distributed=off contradicts --num_processes"):
        distributed.initialize(num_processes=2, mode="off")
    with pytest.raises(ValueError, match=r"--process_id=2 must lie in \[0, --num_processes=2\)"):
        distributed.initialize("localhost:1", 2, 2)
    assert distributed.initialize() is False  # nothing given, no cluster: one process
