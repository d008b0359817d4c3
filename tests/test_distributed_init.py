"""`distributed.maybe_initialize`: when it initializes jax.distributed, and with what arguments
(`jax.distributed.initialize` is recorded, not called; the real call runs in tests/test_multihost.py)."""
import jax
import pytest

from sano_jax import distributed

# maybe_initialize: when it initializes, and with what (the real call: the two-process test).

_ENV = ('SANO_DISTRIBUTED', 'JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


@pytest.fixture
def init_calls(monkeypatch):
  """The calls to jax.distributed.initialize (kwargs dicts) and the CPU collectives chosen, with
  none of the variables maybe_initialize reads set and JAX not yet distributed."""
  for var in _ENV:
    monkeypatch.delenv(var, raising=False)
  calls = {'initialize': [], 'collectives': []}
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls['initialize'].append(kw))
  update = jax.config.update

  def fake_update(name, value):
    if name == 'jax_cpu_collectives_implementation':
      calls['collectives'].append(value)
    else:
      update(name, value)
  monkeypatch.setattr(jax.config, 'update', fake_update)
  return calls


def test_initializes_only_when_asked(init_calls, monkeypatch):
  assert distributed.maybe_initialize() is False
  assert distributed.maybe_initialize(False) is False
  for value in ('0', '', 'true'):  # only SANO_DISTRIBUTED=1 asks
    monkeypatch.setenv('SANO_DISTRIBUTED', value)
    assert distributed.maybe_initialize() is False
  monkeypatch.delenv('SANO_DISTRIBUTED')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')  # without a coordinator address: not asked
  monkeypatch.setenv('JAX_PROCESS_ID', '1')
  assert distributed.maybe_initialize() is False
  assert init_calls == {'initialize': [], 'collectives': []}


@pytest.mark.parametrize('how', ['flag', 'SANO_DISTRIBUTED'])
def test_flag_or_sano_distributed_lets_jax_find_its_peers(init_calls, monkeypatch, how):
  if how == 'flag':
    assert distributed.maybe_initialize(True) is True
  else:
    monkeypatch.setenv('SANO_DISTRIBUTED', '1')
    assert distributed.maybe_initialize() is True
  assert init_calls == {'initialize': [{}], 'collectives': ['gloo']}


@pytest.mark.parametrize('flag', [False, True])
def test_coordinator_variables_are_passed_on(init_calls, monkeypatch, flag):
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.7:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('JAX_PROCESS_ID', '3')
  assert distributed.maybe_initialize(flag) is True
  assert init_calls == {'collectives': ['gloo'], 'initialize': [
      {'coordinator_address': '10.0.0.7:1234', 'num_processes': 4, 'process_id': 3}]}


def test_coordinator_address_alone_leaves_the_rest_to_jax(init_calls, monkeypatch):
  # e.g. on SLURM JAX's cluster detection supplies the process count and id (this was a KeyError).
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'head:1234')
  assert distributed.maybe_initialize() is True
  assert init_calls['initialize'] == [{'coordinator_address': 'head:1234'}]


def test_bad_process_variables_are_clear_errors(init_calls, monkeypatch):
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'head:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', 'two')
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
    distributed.maybe_initialize()
  assert init_calls['initialize'] == []


def test_already_distributed_is_not_initialized_again(init_calls, monkeypatch):
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: True)
  assert distributed.maybe_initialize(True) is True
  assert init_calls['initialize'] == []


# ------------------------------------------------------------------------------------------------
# distributed.barrier (the real wait: train_and_evaluate in tests/test_multihost.py).


class _Client:
  """Records wait_at_barrier calls in place of JAX's coordination-service client."""

  def __init__(self):
    self.waits = []

  def wait_at_barrier(self, barrier_id, timeout_in_ms):
    self.waits.append((barrier_id, timeout_in_ms))


@pytest.fixture
def client(monkeypatch):
  from jax._src import distributed as jax_distributed
  jax.devices()  # the backend first: it would take the fake for a real client
  fake = _Client()
  monkeypatch.setattr(jax_distributed.global_state, 'client', fake)
  monkeypatch.setattr(distributed, '_barriers', {})
  return fake


def test_barrier_is_a_no_op_in_one_process(client):
  assert jax.process_count() == 1
  distributed.barrier('start')
  assert client.waits == []


def test_barrier_waits_at_the_coordination_service_with_its_limit(client, monkeypatch):
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  distributed.barrier('start')
  distributed.barrier('compiled', timeout_s=2.5)
  distributed.barrier('start')  # a name used again is a new barrier of the service
  assert client.waits == [('start:0', 3_600_000), ('compiled:0', 2500), ('start:1', 3_600_000)]


def test_barrier_without_a_client_is_a_clear_error(client, monkeypatch):
  from jax._src import distributed as jax_distributed
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax_distributed.global_state, 'client', None)
  with pytest.raises(RuntimeError, match='no jax.distributed client'):
    distributed.barrier('start')
