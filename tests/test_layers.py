"""The layer rules of docs/design.md, as import-linter contracts (.importlinter): a module imports
only from the layers below it, the maths touch no files, checkpoints or methods, metrics know no
model. Checked in-process with import-linter's own report (what `lint-imports` prints from)."""
import os

from importlinter import api
from importlinter.application import use_cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, '.importlinter')


def test_import_contracts_are_kept(tmp_path, monkeypatch):
  assert api.read_configuration  # importing importlinter.api configures import-linter's adapters
  monkeypatch.chdir(ROOT)  # import-linter finds the package from the working directory
  # lint-imports registers the built-in contract types (layers, forbidden) before it reports; its
  # console output is left out (under xdist it writes to a stream pytest has closed).
  use_cases._register_built_in_contract_types()  # pylint: disable=protected-access
  options = use_cases.read_user_options(CONFIG)
  report = use_cases.create_report(options, cache_dir=str(tmp_path))
  checks = list(report.get_contracts_and_checks())
  assert len(checks) == 5 and not report.could_not_run
  broken = {c.name: check.metadata for c, check in checks if not check.kept}
  assert not broken, broken
  assert all(check.ignored_import_count == 0 for _, check in checks)
  with open(CONFIG) as f:
    assert 'ignore_imports' not in f.read()
