"""Kill harness (issue 11): run_train.py SIGKILLed at 10 moments drawn from a seeded rng (during
training steps, during checkpoint writes to checkpoints/ and best/, during validation), restarted
with the same command after each kill, ends with the train state of an uninterrupted run, bit for
bit; after every kill, every step folder left under checkpoints/ and best/ restores.

The moments are events seen from outside the child, polled every few ms: a metrics.jsonl row
(log_every=1: one per step; the row of a step at which validation is due is written just before
the validation starts), an Orbax temporary folder (`<step>.orbax-checkpoint-tmp`: a write in
progress) or a new step folder (the write renamed into place; the oldest one is dropped next).
Which phase each kill actually hit is read off the disk after the kill (`_phase`), printed as a
table (pytest -s) and checked to cover the three phases. The seeded plan makes the kinds, order,
offsets and delays reproducible; the phases hit depend on timing, but varied little from run to
run (a 2-core machine at load 5-12).

Dropping a checkpoint (~1 ms, which the harness seldom hits) is covered by a simulated kill
in-process (`test_kill_while_a_checkpoint_is_dropped_leaves_every_listed_step_whole`).

Cost: 12 starts of run_train.py (the reference, 10 killed, the last), each tracing the model and
its steps again. The children share the worker's persistent compilation cache (tests/conftest.py;
the reference run, first, fills what is missing) and skip TensorBoard
(helpers.run_train_fast_process): ~25 s a start instead of ~2.5 min on a busy 2-core machine.
"""
import contextlib
import dataclasses
import json
import os
import re
import signal
import time

import numpy as np
import pytest

from tests import helpers

SEED = 11  # the kill plan: kinds, order, offsets and delays
NUM_KILLS = 10
NUM_STEPS = 70  # ample: a kill makes at most ~10 steps of progress (the fall-back trigger), ~2 typically
CKPT_EVERY, EVAL_EVERY, KEEP = 5, 10, 3
FLAGS = [f'--config.training.num_train_steps={NUM_STEPS}',
         f'--config.training.checkpoint_every={CKPT_EVERY}',
         f'--config.training.eval_every={EVAL_EVERY}', f'--config.training.keep_checkpoints={KEEP}',
         '--config.training.log_every=1', '--config.training.eval_batches=4',
         # The smallest U-Net: one level, no attention (fewer ops to trace at each start).
         '--config.model.ch_mult=(1,)', '--config.model.attn_resolutions=()']
TMP = '.orbax-checkpoint-tmp'
TRASH = 'dropped.tmp'  # where checkpointing.py has Orbax move a checkpoint it drops, then deletes it
POLL_S = 0.002


@pytest.fixture(scope='module')
def reference(tmp_path_factory, textures_dir):
  """The uninterrupted run of FLAGS (it fills the compilation cache the later starts read): the
  end that every interrupted run must reach, bit for bit."""
  ref = tmp_path_factory.mktemp('reference') / 'run'
  log = ref.parent / 'reference.log'
  code, out = helpers.finish_process(
      helpers.run_train_fast_process(ref, textures_dir, *FLAGS, log=log), log)
  assert code == 0, out[-4000:]
  return ref


# ------------------------------------------------------------------------------------------------
# What can be seen of a run from outside.


def _names(folder):
  try:
    return os.listdir(folder)
  except FileNotFoundError:
    return []


def _steps(folder):
  return sorted(int(n) for n in _names(folder) if n.isdigit())


def _tmp_steps(folder, since_ns: int = 0):
  """Steps with an Orbax temporary folder (a write in progress, or one a kill interrupted)
  modified at or after `since_ns` (time.time_ns())."""
  out = []
  for n in _names(folder):
    if TMP in n:
      try:
        if os.stat(os.path.join(folder, n)).st_mtime_ns >= since_ns:
          out.append(int(n.split('.')[0]))
      except FileNotFoundError:  # renamed or removed meanwhile
        pass
  return sorted(out)


class _Rows:
  """The metrics.jsonl rows one child appends. A child resumed at step r first drops the rows
  after r that the killed run wrote (and a cut last line), rewriting the file; until it has, the
  file holds the killed run's rows and none is read. Its own rows start after the rows of steps
  <= r."""

  def __init__(self, path, resumed_from=0):
    self.path = path
    from sano_jax import summaries  # pylint: disable=g-import-not-at-top
    data = path.read_bytes() if path.exists() else b''
    kept = summaries._rows_up_to(data.decode(), resumed_from).encode()  # pylint: disable=protected-access
    self.offset = len(kept)
    # Something to drop: the child rewrites the file (a new inode) before it appends.
    self.stale_inode = os.stat(path).st_ino if kept != data else None
    self.rows, self.bad = [], []

  def poll(self):
    try:
      if self.stale_inode is not None and os.stat(self.path).st_ino == self.stale_inode:
        return self.rows  # not yet rewritten by the child
      with open(self.path, 'rb') as f:
        f.seek(self.offset)
        data = f.read()
    except FileNotFoundError:
      return self.rows
    end = data.rfind(b'\n') + 1  # whole lines only: a row being written is read next time
    for line in data[:end].splitlines():
      try:
        self.rows.append(json.loads(line))
      except ValueError:
        self.bad.append(line)
    self.offset += end
    return self.rows

  def train_steps(self):
    return [r['step'] for r in self.rows if 'train/loss' in r]

  def validated(self, step):
    return any(r['step'] == step and 'validation/loss' in r for r in self.rows)


# ------------------------------------------------------------------------------------------------
# The kill plan and its triggers.


@dataclasses.dataclass
class Kill:
  kind: str  # what the trigger waits for (see _fired)
  offset: int = 0  # 'steps': the step (after the resumed one) whose row arms the trigger
  delay: float = 0.0  # seconds from the trigger to the SIGKILL
  resumed_from: int | None = None
  fired_by: str = ''  # 'plan', or 'fall-back' (the run got EVAL_EVERY + 1 steps past its start)
  last_row_step: int | None = None
  phase: str = ''  # what the disk shows after the kill (_phase)
  left: str = ''  # leftovers on disk after the kill (tmp folders, extra steps)


def _plan(rng) -> list[Kill]:
  kinds = (['steps'] * 3 + ['validation'] * 3 + ['checkpoint-tmp'] * 2 + ['best-tmp']
           + ['checkpoint-renamed'])
  assert len(kinds) == NUM_KILLS
  plan = []
  for kind in rng.permutation(kinds):
    if kind == 'steps':  # a random moment after a random step
      plan.append(Kill(kind, offset=int(rng.integers(1, EVAL_EVERY)), delay=float(rng.uniform(0, 0.2))))
    elif kind == 'validation':  # the first validation of the child compiles: a wide window
      plan.append(Kill(kind, delay=float(rng.uniform(0, 0.05))))
    else:  # a write lasts tens of ms: kill on sight
      plan.append(Kill(str(kind)))
  return plan


def _fired(kill: Kill, rows: _Rows, workdir, r: int, since_ns: int) -> bool:
  """Whether `kill`'s event has happened in the child resumed at step `r`, started at
  `since_ns` (a temporary folder an earlier kill left does not count)."""
  ck, best = workdir / 'checkpoints', workdir / 'best'
  steps = rows.train_steps()
  if kill.kind == 'steps':
    return any(s >= r + kill.offset for s in steps)
  if kill.kind == 'validation':  # its row is written, its validation/loss row not yet
    return any(s > r and s % EVAL_EVERY == 0 and not rows.validated(s) for s in steps)
  if kill.kind == 'checkpoint-tmp':
    return any(s > r for s in _tmp_steps(ck, since_ns))
  if kill.kind == 'best-tmp':
    return any(s > r for s in _tmp_steps(best, since_ns))
  if kill.kind == 'checkpoint-renamed':
    return any(s > r for s in _steps(ck))
  raise ValueError(kill.kind)


def _phase(rows: _Rows, workdir, since_ns: int) -> str:
  """The phase the child (started at `since_ns`) was in when killed, as the disk shows it."""
  ck, best = workdir / 'checkpoints', workdir / 'best'
  if _tmp_steps(ck, since_ns):
    return 'checkpoint write'
  if _tmp_steps(best, since_ns):
    return 'best checkpoint write'
  if len(_steps(ck)) > KEEP or len(_steps(best)) > 1 or (ck / TRASH).exists() or (best / TRASH).exists():
    return 'old checkpoint deletion'
  rows.poll()
  if not rows.rows:
    return 'start-up'
  last = rows.rows[-1]
  s = last['step']
  if 'validation/loss' in last:  # validated: save_best and save follow
    return 'training steps' if s in _steps(ck) else 'between validation and checkpoint write'
  if s % EVAL_EVERY == 0:
    return 'validation'
  if s % CKPT_EVERY == 0 and s not in _steps(ck):
    return 'before checkpoint write'
  return 'training steps'


_RESTORED = set()  # (step folder, its files as (path, size, mtime)): restored once, not again


def _signature(folder) -> tuple:
  return tuple(sorted((os.path.relpath(os.path.join(d, f), folder), st.st_size, st.st_mtime_ns)
                      for d, _, fs in os.walk(folder) for f in fs
                      for st in [os.stat(os.path.join(d, f))]))


def _check_restorable(workdir) -> dict:
  """Every step folder under checkpoints/ and best/ restores with Orbax (as train.py and
  inference open them); no damaged_checkpoints/. Returns {folder: steps}. A step folder whose
  files are unchanged since it last restored is not restored again."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from sano_jax import checkpointing  # pylint: disable=g-import-not-at-top
  assert not (workdir / 'damaged_checkpoints').exists(), _names(workdir / 'damaged_checkpoints')
  store = checkpointing.CheckpointStore(str(workdir), keep=KEEP)
  found = {}
  try:
    for name, mngr in (('checkpoints', store.latest), ('best', store.best)):
      on_disk = _steps(workdir / name)
      assert sorted(mngr.all_steps()) == on_disk, (name, mngr.all_steps(), _names(workdir / name))
      for step in on_disk:
        folder = str(workdir / name / str(step))
        key = (folder, _signature(folder))
        if key in _RESTORED:
          continue
        try:
          mngr.restore(step, args=ocp.args.StandardRestore())
        except Exception as e:  # pylint: disable=broad-except
          pytest.fail(f'{name}/{step} does not restore ({type(e).__name__}: {e}); its files: '
                      f'{[p for p, _, _ in key[1]]}')
        _RESTORED.add(key)
      found[name] = on_disk
  finally:
    store.close()
  return found


def _table(kills) -> str:
  lines = ['kill  planned             resumed  last row  fired by   phase hit'
           '                               left on disk']
  for i, k in enumerate(kills):
    plan = k.kind + (f'+{k.offset}' if k.kind == 'steps' else '')
    lines.append(f'{i:>4}  {plan:<18}  {k.resumed_from!s:>7}  {k.last_row_step!s:>8}  '
                 f'{k.fired_by:<9}  {k.phase:<38}  {k.left}')
  return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ten_sigkills_at_random_moments_end_bit_identical(tmp_path, textures_dir, reference):
  t_start, ref, data_dir = time.monotonic(), reference, textures_dir

  wd, t_checks = tmp_path / 'killed', 0.0
  kills = _plan(np.random.default_rng(SEED))
  for i, kill in enumerate(kills + [None]):
    ck = _steps(wd / 'checkpoints')
    r = ck[-1] if ck else 0
    log = tmp_path / f'killed_{i}.log'
    rows = _Rows(wd / 'metrics.jsonl', resumed_from=r)
    since_ns = time.time_ns()
    proc = helpers.run_train_fast_process(wd, data_dir, *FLAGS, log=log)
    if kill is None:  # the last start: it finishes
      code, out = helpers.finish_process(proc, log)
      assert code == 0, out[-4000:]
    else:
      kill.resumed_from = r
      deadline, fired_at = time.monotonic() + helpers.subprocess_timeout(), None
      while True:
        rows.poll()
        if fired_at is None:
          if _fired(kill, rows, wd, r, since_ns):
            fired_at, kill.fired_by = time.monotonic(), 'plan'
          elif any(s > r + EVAL_EVERY for s in rows.train_steps()):  # bounds the progress
            fired_at, kill.fired_by = time.monotonic(), 'fall-back'
        if fired_at is not None and time.monotonic() >= fired_at + kill.delay:
          break
        if proc.poll() is not None:
          pytest.fail(f'kill {i} ({kill.kind}): the child exited ({proc.returncode}) first:\n'
                      f'{helpers.read_log(log)}\n{_table(kills[:i + 1])}')
        if time.monotonic() > deadline:
          proc.kill()
          proc.wait()
          pytest.fail(f'kill {i} ({kill.kind}): no trigger after {helpers.subprocess_timeout():.0f}'
                      f' s:\n{helpers.read_log(log)}')
        time.sleep(POLL_S)
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      out = helpers.read_log(log, tail=10**7)
      assert proc.returncode == -signal.SIGKILL, (proc.returncode, out[-4000:])
      assert all(s < NUM_STEPS for s in _steps(wd / 'checkpoints')), _table(kills[:i + 1])  # cut short
      kill.phase = _phase(rows, wd, since_ns)
      train = rows.train_steps()
      kill.last_row_step = train[-1] if train else None
      tmp = [f'checkpoints/{s}{TMP}' for s in _tmp_steps(wd / 'checkpoints')]
      tmp += [f'best/{s}{TMP}' for s in _tmp_steps(wd / 'best')]
      tmp += [f'{d}/{TRASH}' for d in ('checkpoints', 'best') if (wd / d / TRASH).exists()]
      kill.left = ' '.join(tmp + [f'checkpoints={_steps(wd / "checkpoints")}',
                                  f'best={_steps(wd / "best")}'])
    # The child resumed where the disk said, found nothing damaged, wrote whole rows.
    rows.poll()
    if r:
      assert f'at step {r}' in out, out[-4000:]  # "resumed from ... at step r"
    assert 'damaged' not in out, out[-4000:]
    assert not rows.bad, rows.bad
    # Nothing left that a later restore trips over.
    t = time.monotonic()
    _check_restorable(wd)
    t_checks += time.monotonic() - t
  print(f'\n{_table(kills)}\nrestore checks {t_checks:.0f} s, whole test '
        f'{time.monotonic() - t_start:.0f} s')

  # Every kill fired, and they hit every phase.
  assert len(kills) == NUM_KILLS and all(k.phase for k in kills), _table(kills)
  phases = {k.phase for k in kills}
  assert 'training steps' in phases, _table(kills)
  assert 'validation' in phases, _table(kills)
  assert phases & {'checkpoint write', 'best checkpoint write'}, _table(kills)
  # The end: no temporary folder left, the same step folders as the reference's, all restorable,
  # and the same train state (params, EMA params, optimizer state, step, rng) and best params,
  # bit for bit.
  assert not [n for n in _names(wd / 'checkpoints') + _names(wd / 'best') if not n.isdigit()], (
      _names(wd / 'checkpoints'), _names(wd / 'best'))
  assert _check_restorable(wd) == _check_restorable(ref)
  helpers.assert_same_checkpoint(wd, ref, NUM_STEPS)
  _assert_same_best(wd, ref)


def _assert_same_best(workdir_a, workdir_b) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from sano_jax import checkpointing  # pylint: disable=g-import-not-at-top
  trees = []
  for wd in (workdir_a, workdir_b):
    store = checkpointing.CheckpointStore(str(wd))
    trees.append(store.best.restore(store.best.latest_step(), args=ocp.args.StandardRestore()))
    store.close()
  a, b = (jax.tree_util.tree_flatten_with_path(t)[0] for t in trees)
  assert [p for p, _ in a] == [p for p, _ in b]
  for (path, x), (_, y) in zip(a, b):
    np.testing.assert_array_equal(x, y, err_msg=f'best/ {jax.tree_util.keystr(path)}')


# ------------------------------------------------------------------------------------------------
# The deletion window, which the harness above seldom hits: after writing a step, Orbax drops one
# (the oldest beyond `keep` in checkpoints/; in best/, the worse of the two), file by file, in ~1 ms.


class _Killed(BaseException):
  """A SIGKILL, simulated in-process: raised from a file removal, nothing catches it."""


def _kill_at_removal(monkeypatch, n: int) -> None:
  """Once a new step has been renamed into place (`<step>.orbax-checkpoint-tmp` to `<step>`), the
  n-th file or folder removal raises _Killed instead (n = 1: the first)."""
  count, armed = [0], [False]
  real_rename = os.rename

  def rename(src, dst, *args, **kwargs):
    out = real_rename(src, dst, *args, **kwargs)
    armed[0] = armed[0] or (str(src).endswith(TMP) and os.path.basename(str(dst)).isdigit())
    return out

  monkeypatch.setattr(os, 'rename', rename)
  for name in ('unlink', 'remove', 'rmdir'):
    real = getattr(os, name)

    def removal(*args, _real=real, **kwargs):
      if armed[0]:
        count[0] += 1
        if count[0] == n:
          raise _Killed()
      return _real(*args, **kwargs)

    monkeypatch.setattr(os, name, removal)


@pytest.mark.parametrize('removal', [1, 5, 10, 15])
@pytest.mark.parametrize('dropped', ['oldest checkpoint', 'previous best', 'new worse best'])
def test_kill_while_a_checkpoint_is_dropped_leaves_every_listed_step_whole(
    tmp_path, monkeypatch, dropped, removal):
  """A kill while Orbax drops a checkpoint (simulated: the `removal`-th file removal after the
  new step is renamed into place raises) leaves no listed step that does not restore, and nothing
  that stops the next run's saves. (Orbax used to delete the dropped step in place, file by file:
  killed at removal 15 that step was listed and did not restore; in best/, killed from removal 5
  it was listed for good, its metrics deleted.)"""
  from sano_jax import checkpointing  # pylint: disable=g-import-not-at-top
  tree = lambda v: {'params': {'w': np.full((3,), v, np.float32)},
                    'ema_params': {'w': np.full((3,), -v, np.float32)}}
  wd = tmp_path / 'run'
  store = checkpointing.CheckpointStore(str(wd), keep=KEEP)
  for step in range(1, KEEP + 1):
    store.save(step, tree(step))
  store.save_best(1, tree(1), 0.5)
  _kill_at_removal(monkeypatch, removal)
  with contextlib.suppress(_Killed):  # (a step has fewer than `removal` files: no kill)
    if dropped == 'oldest checkpoint':
      store.save(KEEP + 1, tree(KEEP + 1))
    else:
      store.save_best(2, tree(2), 0.4 if dropped == 'previous best' else 0.6)
  monkeypatch.undo()
  # The next process: every step Orbax lists restores, and training and inference carry on.
  steps = list(range(1, KEEP + 1)) + ([KEEP + 1] if dropped == 'oldest checkpoint' else [])
  found = _check_restorable(wd)
  assert found['checkpoints'][-1] == steps[-1], found
  store = checkpointing.CheckpointStore(str(wd), keep=KEEP)
  if dropped == 'new worse best':  # resumed before step 2, the run validates it again: dropped again
    store.save_best(2, tree(2), 0.6)
  store.save(KEEP + 2, tree(KEEP + 2))
  store.save_best(KEEP + 2, tree(KEEP + 2), 0.1)
  store.close()
  steps = (steps + [KEEP + 2])[-KEEP:]
  found = _check_restorable(wd)
  assert found == {'checkpoints': steps, 'best': [KEEP + 2]}, found
  assert sorted(os.listdir(wd / 'checkpoints'), key=int) == [str(s) for s in steps]
  assert os.listdir(wd / 'best') == [str(KEEP + 2)]


# ------------------------------------------------------------------------------------------------
# Preemption: SIGTERM makes run_train.py (as a user runs it, TensorBoard included) finish its step,
# save a checkpoint there and exit 0; the same command resumes there and ends with the train state
# of the uninterrupted reference, bit for bit.


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_resumes_bit_identically(tmp_path, textures_dir, reference):
  # Run 1: SIGTERM once training runs (the first metrics row is written after the first step).
  wd, log = tmp_path / 'run', tmp_path / 'run.log'
  proc = helpers.run_train_process(wd, textures_dir, *FLAGS, log=log)
  metrics = wd / 'metrics.jsonl'
  helpers.wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, proc, log,
                   'first metrics row')
  proc.send_signal(signal.SIGTERM)
  code, out = helpers.finish_process(proc, log)
  assert code == 0, out[-4000:]
  found = re.search(r'preempted at step (\d+): saved a checkpoint at step (\d+)', out)
  assert found, out[-4000:]
  step = int(found.group(1))
  assert int(found.group(2)) == step and 0 < step < NUM_STEPS
  assert _steps(wd / 'checkpoints')[-1] == step, _steps(wd / 'checkpoints')
  # Run 2: the same command resumes at that step and finishes.
  log = tmp_path / 'resumed.log'
  code, out = helpers.finish_process(helpers.run_train_process(wd, textures_dir, *FLAGS, log=log), log)
  assert code == 0, out[-4000:]
  assert f'at step {step}' in out  # "resumed from ... at step N"
  assert 'preempted at step' not in out
  # The end: the uninterrupted run's train state at the last step, bit for bit.
  helpers.assert_same_checkpoint(wd, reference, NUM_STEPS)
