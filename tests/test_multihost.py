"""Two processes on localhost (jax.distributed, gloo CPU collectives, 2 devices each) train exactly
like one process with 4 devices fed the same global batches.

The children always run on CPU (JAX_PLATFORMS=cpu, whatever the parent has), write their output to
files (never to a pipe that nobody reads while the test waits), and get a generous limit
(SANO_TEST_SUBPROCESS_TIMEOUT, default 600 s). The coordinator's port is picked free and then
released, so another program may take it before the coordinator binds it: a pair whose processes
fail before both have joined is started again on a new port (at most 3 times).
"""
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import read_log, subprocess_env, subprocess_timeout

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'multihost_worker.py')
ATTEMPTS = 3


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _kill(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
  for p in procs:
    p.wait()


def _run_pair(out, logs, port, deadline):
  """Starts the two processes; returns (return codes, outputs, started) where started says whether
  both joined the distributed runtime (the worker prints 'initialized' once it has)."""
  procs = []
  for i, log in enumerate(logs):
    with open(log, 'w') as f:
      procs.append(subprocess.Popen(
          [sys.executable, WORKER, str(out), '2'], stdout=f, stderr=subprocess.STDOUT,
          env=subprocess_env(2, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
                             JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i)))
  try:
    while any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs):  # one failed: the other would wait forever
        break
      if time.monotonic() > deadline:
        pytest.fail(f'the two processes did not finish in {subprocess_timeout():.0f} s '
                    '(SANO_TEST_SUBPROCESS_TIMEOUT):\n' + '\n'.join(read_log(l) for l in logs))
      time.sleep(0.2)
  finally:
    _kill(procs)
  outs = [read_log(l, tail=10**6) for l in logs]
  started = all(f'process {i} initialized' in o for i, o in enumerate(outs))
  return [p.returncode for p in procs], outs, started


def test_two_processes_match_one_process(tmp_path):
  deadline = time.monotonic() + subprocess_timeout()
  single_log = tmp_path / 'single.log'
  with open(single_log, 'w') as f:  # runs meanwhile
    single = subprocess.Popen([sys.executable, WORKER, str(tmp_path / 'single.npz'), '4'],
                              stdout=f, stderr=subprocess.STDOUT, env=subprocess_env(4))
  try:
    for attempt in range(ATTEMPTS):
      logs = [tmp_path / f'process{i}_attempt{attempt}.log' for i in range(2)]
      codes, outs, started = _run_pair(tmp_path / 'multi.npz', logs, _free_port(), deadline)
      if codes == [0, 0] or started:
        break  # done, or a failure after start-up: a real one, reported below
    single.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pytest.fail(f'the single process did not finish:\n{read_log(single_log)}')
  finally:
    _kill([single])
  assert single.returncode == 0, read_log(single_log)
  for code, out in zip(codes, outs):
    assert code == 0, f'(attempt {attempt + 1} of {ATTEMPTS})\n{out[-4000:]}'
  assert 'process 1 of 2 done' in outs[1] and 'process 0 of 2 done' in outs[0]
  multi, one = np.load(tmp_path / 'multi.npz'), np.load(tmp_path / 'single.npz')
  assert sorted(multi.files) == sorted(one.files) and len(one.files) > 10
  for k in one.files:
    np.testing.assert_allclose(multi[k], one[k], atol=1e-5, err_msg=k)
