"""The base of this project's TFDS builders: array_record by default, code found from the module."""
import sys

from etils import epath
import tensorflow_datasets as tfds


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A GeneratorBasedBuilder that writes array_record (read by `tfds.data_source`, no TF needed)."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # pylint: disable=no-self-argument
    # tfds 4.9.10 would look this up with the `importlib_resources` backport, which it only
    # requires on Python < 3.9: the file of the module defining the builder subclass.
    return epath.Path(sys.modules[cls.__module__].__file__)

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or 'array_record', **kwargs)
