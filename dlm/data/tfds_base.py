"""The base of every dlm tfds builder (`dlm.data.builders`, `dlm.data.conditional`):
array_record files, records in generation order, and the train split's characters."""

from __future__ import annotations

from collections.abc import Iterable

import tensorflow_datasets as tfds
from etils import epath


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes array_record; `FEATURES` (a dict of tfds features) is a subclass's record; the
    train split's characters are stored as the `char_vocab` metadata."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # tfds infers this through the `importlib_resources` backport, which is not installed.
    code_path = epath.Path(__file__)
    FEATURES: dict = {}
    _DESCRIPTION = ""
    _HOMEPAGE = None
    _CITATION = None

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self._DESCRIPTION,
            features=tfds.features.FeaturesDict(dict(self.FEATURES)),
            disable_shuffling=True,  # record i == i-th generated example
            metadata=tfds.core.MetadataDict(),
            homepage=self._HOMEPAGE,
            citation=self._CITATION,
        )

    def _record_char_vocab(self, chars: Iterable[str]) -> None:
        """Stores the train split's characters (written with the DatasetInfo once every
        split is generated)."""
        self.info.metadata["char_vocab"] = sorted(set(chars))
