"""Multi-host training: a real run of `train.train_and_evaluate` by two processes on localhost
(jax.distributed, gloo CPU collectives, 2 simulated CPU devices each) that stops, resumes, and ends
where one process with 4 devices does. The workers add no synchronization of their own: on a busy
machine one process can fall far behind the other, and only train.py's `distributed.barrier`s keep
it within gloo's 30 s limit to join the first collective.

The children always run on CPU (JAX_PLATFORMS=cpu, whatever the parent has), write their output to
files (never to a pipe that nobody reads while the test waits), and each phase gets a generous
limit (SANO_TEST_SUBPROCESS_TIMEOUT, default 600 s; a hung child still ends the test).

The coordinator's port is picked free and then released, so another program may take it first: a
pair that fails before both processes have joined is started again on a new port
(`helpers.run_process_pair`); a failure after both joined is a real one and is reported.
"""
import ast
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import finish_process, run_process_pair, subprocess_env

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'multihost_worker.py')
N = 4  # the first run trains to step N (evaluating and checkpointing at 2 and 4), the resumed to 2N


def _pair(tmp_path, name, args):
  """Both processes' outputs of a successful pair run of the worker with `args` (each process
  with its own compilation cache: the resumed run compiles nothing)."""
  outs = run_process_pair([WORKER, *args], tmp_path / name)
  for i, out in enumerate(outs):
    assert f'process {i} of 2 pid' in out, out[-4000:]
  return outs


def _report(out, i, what):
  return re.findall(rf'^process {i} {what}', out, re.M)


def _wrote(out, i):
  (listed,) = _report(out, i, r'wrote (\[.*\])')
  return ast.literal_eval(listed)


def _pid(out, i):
  (pid,) = _report(out, i, r'of \d+ pid (\d+) done')
  return int(pid)


def _params(prefix):
  with np.load(prefix) as f:
    return {k: f[k] for k in f.files}


def _steps(folder):
  return sorted(int(s) for s in os.listdir(folder) if s.isdigit())


def _rows(workdir, key):
  """{step: value} of `key` in metrics.jsonl; every step at most once."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  steps = [r['step'] for r in rows if key in r]
  assert len(steps) == len(set(steps)), (key, steps)
  return {r['step']: r[key] for r in rows if key in r}


@pytest.mark.slow
def test_two_processes_train_resume_and_match_one_process(tmp_path):
  wd, single_wd = tmp_path / 'run', tmp_path / 'single'
  args = lambda steps: [str(wd), str(steps), '2', str(tmp_path / f'params{steps}')]
  # The reference, meanwhile: one process with 4 devices trains to 2N without stopping.
  single_log = tmp_path / 'single.log'
  with open(single_log, 'w') as f:
    single = subprocess.Popen(
        [sys.executable, WORKER, str(single_wd), str(2 * N), '4', str(tmp_path / 'single')],
        stdout=f, stderr=subprocess.STDOUT, env=subprocess_env(4, SANO_TEST_NO_TENSORBOARD=1))
  try:
    first = _pair(tmp_path, 'first', args(N))
    code, out = finish_process(single, single_log)
  finally:
    if single.poll() is None:  # the pair failed
      single.kill()
      single.wait()
  assert code == 0, out[-4000:]
  second = _pair(tmp_path, 'resumed', args(2 * N))  # the same command, to 2N

  for outs, step in ((first, N), (second, 2 * N)):
    # Only process 0 writes logs and the config (process 1 writes nothing outside the checkpoints).
    assert {'config.json', 'metrics.jsonl'} <= set(_wrote(outs[0], 0)), outs[0][-4000:]
    assert _wrote(outs[1], 1) == [], outs[1][-4000:]
    # Both processes end with the same params, bit for bit.
    p0, p1 = (_params(tmp_path / f'params{step}.{i}.npz') for i in range(2))
    assert int(p0['step']) == int(p1['step']) == step
    for k in p0:
      np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)
  # The first run started fresh; the second restored the first's last checkpoint on both processes.
  assert [_report(first[i], i, r'restored step (\d+)') for i in range(2)] == [[], []]
  assert [_report(second[i], i, r'restored step (\d+)') for i in range(2)] == [[str(N)], [str(N)]]
  assert _steps(wd / 'checkpoints') == [N, N + 2, 2 * N]  # keep_checkpoints=3
  assert len(_steps(wd / 'best')) == 1
  # TensorBoard: one event file per run, each written by that run's process 0.
  events = sorted(glob.glob(str(wd / '**' / 'events.out.tfevents.*'), recursive=True))
  pids = sorted(int(re.search(r'\.(\d+)\.\d+\.v2$', e).group(1)) for e in events)
  assert pids == sorted([_pid(first[0], 0), _pid(second[0], 0)]), (events, first[1][-200:])
  assert all(os.path.dirname(e) == str(wd / 'tensorboard') for e in events), events
  assert os.listdir(wd) and set(os.listdir(wd)) <= {'config.json', 'metrics.jsonl', 'tensorboard',
                                                    'checkpoints', 'best'}, os.listdir(wd)
  # metrics.jsonl: each logged and evaluated step once (no step logged twice by two processes or
  # again after the resume), the same numbers as the run that did not stop.
  for key in ('train/loss', 'validation/loss'):
    rows, ref = _rows(wd, key), _rows(single_wd, key)
    assert sorted(rows) == sorted(ref) == [2, 4, 6, 8], (key, rows, ref)
    np.testing.assert_allclose([rows[s] for s in ref], list(ref.values()), rtol=1e-5, err_msg=key)
  # The final params equal those of one process with 4 devices and no stop.
  multi, one = _params(tmp_path / f'params{2 * N}.0.npz'), _params(tmp_path / 'single.0.npz')
  assert sorted(multi) == sorted(one) and len(one) > 10
  for k in one:
    np.testing.assert_allclose(multi[k], one[k], rtol=0, atol=1e-5, err_msg=k)
