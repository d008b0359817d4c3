"""Two processes on localhost (jax.distributed, gloo CPU collectives, 2 devices each) train exactly
like one process with 4 devices fed the same global batches."""
import os
import socket
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'multihost_worker.py')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_')}
  env.update(extra)
  return env


def test_two_processes_match_one_process(tmp_path):
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, WORKER, str(tmp_path / 'multi.npz'), '2'],
      env=_env(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
               JAX_PROCESS_ID=str(i)),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  single = subprocess.run([sys.executable, WORKER, str(tmp_path / 'single.npz'), '4'], env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert single.returncode == 0, single.stdout[-3000:]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert 'process 1 of 2 done' in outs[1]
  multi, one = np.load(tmp_path / 'multi.npz'), np.load(tmp_path / 'single.npz')
  assert sorted(multi.files) == sorted(one.files) and len(one.files) > 10
  for k in one.files:
    np.testing.assert_allclose(multi[k], one[k], atol=1e-5, err_msg=k)
