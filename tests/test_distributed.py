"""Across processes: the example of the scaling page (docs/pages/scaling.md), run as two
processes of two CPU devices each (`jax.distributed`, gloo collectives), gives the same
bits as one process of four devices, for the Hessian, GGN and Hutchinson diagonals and
the spectral tools, and every process holds the same results.

The one-process run also starts `jax.distributed` (with one process), so that it sums
over devices with the same collectives: a process without it uses XLA's in-process
all-reduce, which adds the partial sums in another order (agreement to rounding; the
one- against four-device tests of test_devices.py and test_spectral.py cover it).
"""

import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import numpy as np


ROOT = pathlib.Path(__file__).parent.parent
PAGE = ROOT / "docs" / "pages" / "scaling.md"
MARKER = "<!-- scaling-example: the test runs the next block -->"
TIMEOUT = 240  # seconds for all processes together; a hung collective is killed

# Test-only checks appended to the page's script, in the same processes: the checks
# that read values on the host see every process's rows.
CHECKS = r"""

def refused(call, text):
    try:
        call()
    except ValueError as error:
        assert text in str(error), error
    else:
        raise AssertionError(f"no error containing {text!r}")


x, y = batches["mlp"]
# A label out of range, and a NaN, in the rows of the last process only.
bad = np.asarray(labels).copy()
bad[7] = 5
bad_labels = jax.make_array_from_process_local_data(rows, bad[my_rows(8)])
refused(lambda: cz.ggn_diagonal(mlp, ce, (x, bad_labels), mesh=mesh), "got values from 0 to 5")
nan = np.asarray(inputs["mlp"]).copy()
nan[7, 1] = np.nan
nan_inputs = jax.make_array_from_process_local_data(rows, nan[my_rows(8)])
for call in (cz.hessian_diagonal, cz.hessian_eigenvalues):
    kwargs = {"key": key} if call is cz.hessian_eigenvalues else {}
    refused(
        lambda: call(mlp, ce, (nan_inputs, y), mesh=mesh, **kwargs),
        "`batch[0]` holds 1 non-finite value(s)",
    )
print(f"process {jax.process_index()}: checks ok")
"""


def _example() -> str:
    """The Python block that follows the marker on the scaling page."""
    text = PAGE.read_text()
    assert MARKER in text, f"{PAGE} lost its marker {MARKER!r}"
    found = re.search(r"```python\n(.*?)```", text[text.index(MARKER) :], re.S)
    assert found, f"no Python block after the marker in {PAGE}"
    return found.group(1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_all(script: pathlib.Path, runs: dict, tmp: pathlib.Path) -> dict:
    """Start every run (`name -> (devices, arguments)`) at once; wait for all of them,
    killing the rest as soon as one fails (its peers would wait for it) or when
    `TIMEOUT` passes. Returns each run's output; fails showing every output."""
    processes, logs = {}, {}
    for name, (devices, arguments) in runs.items():
        env = dict(os.environ)  # conftest's XLA settings included
        count = f"--xla_force_host_platform_device_count={devices}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {count}"
        env["JAX_PLATFORMS"] = "cpu"
        env["PYTHONUNBUFFERED"] = "1"
        logs[name] = open(tmp / f"{name}.log", "w")  # closed below
        processes[name] = subprocess.Popen(
            [sys.executable, str(script), *arguments],
            env=env, cwd=ROOT, stdout=logs[name], stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline, failed = time.monotonic() + TIMEOUT, None
    while failed is None and any(p.poll() is None for p in processes.values()):
        failed = next((n for n, p in processes.items() if p.poll() not in (None, 0)), None)
        if time.monotonic() > deadline:
            failed = "timeout"
        time.sleep(0.2)
    failed = failed or next((n for n, p in processes.items() if p.returncode != 0), None)
    for process in processes.values():
        if process.poll() is None:
            process.kill()
        process.wait()
    outputs = {}
    for name, log in logs.items():
        log.close()
        outputs[name] = (tmp / f"{name}.log").read_text()
    if failed is not None:
        shown = "\n".join(
            f"--- {name} (exit {processes[name].returncode}) ---\n{_tail(text)}"
            for name, text in outputs.items()
        )
        raise AssertionError(f"run failed ({failed}):\n{shown}")
    return outputs


def _tail(text: str, lines: int = 40) -> str:
    """The end of a log, without gloo's connection chatter."""
    kept = [line for line in text.splitlines() if not line.startswith("[Gloo]")]
    return "\n".join(kept[-lines:])


def test_two_processes_give_the_bits_of_one(tmp_path):
    script = tmp_path / "scaling_example.py"
    script.write_text(_example() + CHECKS)
    one, two = tmp_path / "one", tmp_path / "two"
    address = f"127.0.0.1:{_free_port()}"
    reference = f"127.0.0.1:{_free_port()}"
    outputs = _run_all(
        script,
        {
            "one-process": (4, [str(one), reference, "1", "0"]),
            "process-0": (2, [str(two), address, "2", "0"]),
            "process-1": (2, [str(two), address, "2", "1"]),
        },
        tmp_path,
    )
    for name, text in outputs.items():  # shown with `pytest -rA` or `-s`
        print(f"--- {name} ---\n{_tail(text, 5)}")
    assert "process 0 of 1:" in outputs["one-process"]
    for i in (0, 1):
        assert f"process {i} of 2:" in outputs[f"process-{i}"]
        assert f"process {i}: checks ok" in outputs[f"process-{i}"]
    names = sorted(path.name[: -len("-0.npy")] for path in one.glob("*-0.npy"))
    assert len(names) == 11, names
    for name in names:
        expected = np.load(one / f"{name}-0.npy")
        assert expected.size and np.any(expected != 0), name
        for i in (0, 1):
            np.testing.assert_array_equal(np.load(two / f"{name}-{i}.npy"), expected, err_msg=name)
