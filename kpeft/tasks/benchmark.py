"""What the paper benchmarks share: plain example records from the official files under
``task.data_dir`` or, when it is unset, from the hub (``datasets.load_dataset``, adapted to the same
records); official scoring of a predictions file (``python -m kpeft.score``).

Splits are always ``train``, ``validation``, ``test`` (``dev`` / ``val`` are accepted names for
``validation``). Each task documents its file layout in ``layout``; a missing file is a one-line
error naming ``task.data_dir`` and that layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kpeft import datafiles
from kpeft.errors import KpeftError
from kpeft.tasks.base import Example, Task

SPLITS = ("train", "validation", "test")
_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
            "val": "validation", "test": "test"}

Record = dict[str, Any]


def canonical_split(split: str) -> str:
    try:
        return _ALIASES[split]
    except KeyError:
        raise KpeftError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}") from None


def load_hub(path: str, name: str | None = None, layout: str = "") -> Any:
    """``datasets.load_dataset(path, name)`` (a DatasetDict), or a one-line error saying how to work
    without the hub. Tests replace this function with in-memory datasets."""
    try:
        import datasets
    except ImportError:
        raise KpeftError(
            f"loading '{path}' from the hub needs `pip install datasets`; or pass task.data_dir=DIR with {layout}"
        ) from None
    try:
        dataset = datasets.load_dataset(path, name)
    except Exception as err:  # network, missing dataset, ...: all mean "use the official files"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise KpeftError(
            f"could not load '{path}'{f' ({name})' if name else ''} from the hub ({first}); "
            f"without the hub pass task.data_dir=DIR with {layout}"
        ) from None
    datafiles.note_hub(path, name, dataset)
    return dataset


def read_text(path: str | Path, encoding: str = "utf-8") -> str:
    """A data file's text, or a one-line error: missing, a folder, unreadable, not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise KpeftError(f"file '{path}' {'is a folder' if path.is_dir() else 'does not exist'}; pass a text file")
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as err:
        raise KpeftError(f"file '{path}' is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise KpeftError(f"cannot read '{path}' ({err.strerror}); check its permissions") from None
    datafiles.note_file(path)  # its hash goes into the run's record
    return text


def read_lines(path: str | Path) -> list[str]:
    """A predictions file's lines, split exactly as Python's text-mode iteration splits them
    (``\\n``, ``\\r\\n``, ``\\r``; not ``str.splitlines``'s extra separators), newline removed."""
    path = Path(path)
    if not path.is_file():
        raise KpeftError(f"file '{path}' {'is a folder' if path.is_dir() else 'does not exist'}; pass a text file")
    try:
        with open(path, encoding="utf-8") as f:
            return [line[:-1] if line.endswith("\n") else line for line in f]
    except UnicodeDecodeError as err:
        raise KpeftError(f"file '{path}' is not UTF-8 text ({err.reason} at byte {err.start})") from None


class BenchmarkTask(Task):
    """Base of the paper benchmarks: ``records(split)`` from files or the hub, ``score(...)``."""

    #: Where the official files come from and how they lie under ``task.data_dir`` (error messages).
    layout: str = "the official files"
    #: ``datasets.load_dataset`` arguments for the hub branch.
    hub_path: str = ""
    hub_name: str | None = None
    #: Hub split names of our splits (a hub without one of them derives it, see subclasses).
    hub_splits: dict[str, str] = {"train": "train", "validation": "validation", "test": "test"}

    def __init__(self, cfg, tokenizer=None, pad_token_id: int = 0):
        super().__init__(cfg, tokenizer, pad_token_id)
        self._records: dict[str, list[Record]] = {}
        self._hub: Any = None

    @property
    def options(self) -> Any:
        return self.cfg.options

    # ------------------------------------------------------------ records
    def records(self, split: str) -> list[Record]:
        """The split's plain example records (cached)."""
        split = canonical_split(split)
        if split not in self._records:
            self._records[split] = self.file_records(split) if self.cfg.data_dir else self.hub_records(split)
        return self._records[split]

    def file_records(self, split: str) -> list[Record]:  # pragma: no cover - abstract
        raise NotImplementedError

    def hub_records(self, split: str) -> list[Record]:  # pragma: no cover - abstract
        raise NotImplementedError

    def root(self, required: Sequence[str] = ()) -> Path:
        """``task.data_dir``, checked to hold `required`; else an error naming the layout."""
        return self.data_dir(required, how_to_get=f"it should hold {self.layout}")

    def hub(self) -> Any:
        if self._hub is None:
            self._hub = load_hub(self.hub_path, self.hub_name, self.layout)
        return self._hub

    def hub_split(self, split: str) -> Any:
        name = self.hub_splits[split]
        ds = self.hub()
        if name not in ds:
            raise KpeftError(f"hub dataset '{self.hub_path}' has no split '{name}'; it has: {', '.join(ds)}")
        return ds[name]

    # ------------------------------------------------------------ scoring
    def read_predictions(self, path: str | Path) -> Any:
        """The predictions file of ``python -m kpeft.score`` (default: one line per test example)."""
        return read_lines(path)

    def score(self, predictions: Any, split: str = "test") -> dict[str, Any]:  # pragma: no cover - abstract
        """Official metrics of `predictions` (as :meth:`read_predictions` returns them) on `split`."""
        raise NotImplementedError

    def check_count(self, predictions: Sequence, expected: int, units: str, split: str) -> None:
        if len(predictions) != expected:
            raise KpeftError(
                f"task '{self.name}': {len(predictions)} predictions for the {expected} {units} of split "
                f"'{split}'; give exactly one per line, in order"
            )

    # ------------------------------------------------------------ training
    def load_splits(self) -> dict[str, list[Example]]:
        raise KpeftError(
            f"task '{self.name}': training needs its model encoding, which kpeft does not have yet "
            f"(the data and the official scorer are ready: python -m kpeft.score task={self.name} predictions=FILE)"
        )
